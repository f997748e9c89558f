"""Run one stage against artifact URIs: verify inputs, skip finished work, publish atomically."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pqflow import __version__
from pqflow.artifacts import Artifact, canonical_digest, check_destination, open_artifact, produce
from pqflow.data import check_recipe_data
from pqflow.errors import PqflowError
from pqflow.recipe import Recipe
from pqflow.runtime import peak_rss_mb
from pqflow.stages import StageSpec, get_stage, stage_available


@dataclass
class StageOutcome:
    stage: str
    uri: str
    manifest: dict[str, Any]
    skipped: bool
    seconds: float
    inputs: dict[str, Artifact] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary", {})


def stage_params(spec: StageSpec, recipe: Recipe, input_names: set[str]) -> dict[str, Any]:
    """What the stage's output depends on, besides its inputs (resources do not count)."""
    cfg = recipe.stage(spec.key).model_dump(mode="json", exclude={"resources", "enabled"})
    params: dict[str, Any] = {"stage": cfg}
    if "model" not in input_names:
        params["model"] = recipe.model.model_dump(mode="json", exclude={"name"})
    if "calib" in spec.optional and "calib" not in input_names:
        # without a calib input the stage draws its windows as calibrate would
        params["calibrate"] = recipe.stages.calibrate.model_dump(mode="json", exclude={"resources", "enabled"})
    return params


def fingerprint(spec: StageSpec, params: dict[str, Any], inputs: dict[str, Artifact]) -> str:
    return canonical_digest({
        "stage": spec.name,
        "params": params,
        "inputs": {k: a.digest for k, a in sorted(inputs.items()) if k not in spec.attached},
        "pqflow": __version__,
    })


def run_stage(name: str, recipe: Recipe, input_uris: dict[str, str], out_uri: str, *, force: bool = False,
              on_done: Callable[[StageOutcome], None] | None = None) -> StageOutcome:
    """Run stage ``name``; skipped when ``out_uri`` already holds an artifact with the same fingerprint."""
    spec = get_stage(name)
    if not stage_available(spec):
        raise PqflowError(f"stage '{spec.name}' is not implemented in this pqflow build")
    missing = [i for i in spec.inputs if i not in input_uris]
    unknown = [i for i in input_uris if i not in spec.inputs + spec.optional]
    if missing or unknown:
        raise PqflowError(
            f"stage '{spec.name}' takes inputs {list(spec.inputs)} (optional {list(spec.optional)}); "
            + (f"missing {missing}" if missing else f"unknown {unknown}")
        )
    t0, cpu0 = time.perf_counter(), time.process_time()
    check_destination(out_uri, input_uris)
    check_recipe_data(recipe, missing_ok=True)
    inputs = {k: open_artifact(uri) for k, uri in input_uris.items()}
    params = stage_params(spec, recipe, set(inputs))
    fp = fingerprint(spec, params, inputs)
    manifest, reused = produce(spec.name, out_uri, fp, params, inputs,
                               lambda work: spec.runner()(recipe, inputs, work), force=force)
    outcome = StageOutcome(spec.name, out_uri, manifest, reused, time.perf_counter() - t0, inputs)
    if not reused:
        # CPU seconds too (on a shared machine they say more about the stage than the wall clock),
        # and the process's peak RSS so far (a rise names the stage that set it)
        print(f"[pqflow] {spec.name}: done in {outcome.seconds:.1f}s (cpu {time.process_time() - cpu0:.1f}s, "
              f"peak RSS {peak_rss_mb():.0f} MiB) -> {out_uri}", file=sys.stderr)
    if on_done:
        on_done(outcome)
    return outcome
