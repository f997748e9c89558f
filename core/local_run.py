"""Run a recipe's pipeline on this machine: the same KFP components, in the order of
:func:`pqflow.plan.plan`, executed in this process (see docs/orchestration.md for why not
``kfp.local``).

Each step calls its component's Python function (exactly what the stage's container runs on a
cluster) with KFP artifact objects whose files live in a scratch folder; the pqflow artifacts
themselves go to ``root`` (``file://`` or ``s3://``) and carry the manifests that make a re-run skip
finished work. With a tracking URI, the run gets one MLflow parent run and every step a child run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import inspect
import sys
import time
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqflow.artifacts import check_reachable, read_manifest
from pqflow.errors import PqflowError
from pqflow.plan import Step, plan
from pqflow.recipe import Recipe
from pqflow.stages import get_stage, stage_available
from pqflow.watchdog import clean_stale_scratch, scratch_dir


@dataclass
class StepResult:
    """What a step's component reported (its output artifact's metadata) plus its manifest."""

    step: str
    pointer: dict[str, Any]
    manifest: dict[str, Any]
    seconds: float = 0.0  # wall clock of the step in this process (reused steps included)
    cpu_seconds: float = 0.0

    @property
    def uri(self) -> str:
        return self.pointer["pqflow_uri"]

    @property
    def skipped(self) -> bool:
        return bool(self.pointer.get("skipped"))

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary", {})


@dataclass
class RunResult:
    root: str
    outcomes: dict[str, StepResult]
    seconds: float
    run_key: str = ""
    mlflow_uri: str | None = None
    parent_run_id: str | None = None
    registry: dict[str, Any] = field(default_factory=dict)
    experiment_id: str | None = None

    @property
    def run_url(self) -> str | None:
        """The parent run in the MLflow UI (for an http tracking server)."""
        if not (self.mlflow_uri and self.mlflow_uri.startswith("http") and self.parent_run_id):
            return None
        return f"{self.mlflow_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"

    @property
    def reused_all(self) -> bool:
        return all(o.skipped for o in self.outcomes.values())


def check_buildable(recipe: Recipe) -> list[Step]:
    """The plan, after checking that every planned stage exists in this build."""
    steps = plan(recipe)
    missing = sorted({s.stage for s in steps if not stage_available(get_stage(s.stage))})
    if missing:
        raise PqflowError(
            f"stage(s) {', '.join(missing)} are enabled in recipe '{recipe.name}' but not implemented in this "
            f"pqflow build; disable them (stages.<name>.enabled: false)"
        )
    return steps


def _output_artifact(fn: Callable[..., Any], name: str, uri: str):
    from kfp import dsl

    ann = inspect.signature(fn).parameters[name].annotation
    cls = typing.get_args(ann)[0] if typing.get_args(ann) else dsl.Artifact
    return cls(name=name, uri=uri, metadata={})


def run_step(step: Step, recipe: Recipe, root: str, upstream: dict[str, Any], scratch: Path, *,
             mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False) -> Any:
    """Execute ``step``'s component function in this process; returns its output KFP artifact."""
    import json

    from pqflow.components import COMPONENTS, function

    fn = function(step.stage)
    out_name = COMPONENTS[step.stage].output
    out = _output_artifact(fn, out_name, str(scratch / step.name / out_name))
    kwargs = {name: upstream[src] for name, src in step.inputs.items()}
    fn(recipe=json.dumps(recipe.model_dump(mode="json"), sort_keys=True), root=root, step=step.name,
       mlflow_uri=mlflow_uri, parent_run=parent_run, run_key=run_key, force=force, **{out_name: out}, **kwargs)
    return out


def release_memory() -> None:
    """Hand the memory of the step that just ended back to the OS before the next one starts.

    The steps share one process: without this, the heap that glibc keeps after a stage frees its
    model (tensors of a few MiB come from the heap, not from mmap) stays resident, and the next
    stage's peak sits on top of it."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def run_plan(recipe: Recipe, root: str | None = None, *, force: bool = False, mlflow_uri: str | None = None,
             on_step: Callable[[str, StepResult], None] | None = None) -> RunResult:
    """Run every planned step in order; with ``mlflow_uri`` track the run in MLflow."""
    root = root or recipe.storage.root
    clean_stale_scratch()  # scratch folders of runs that were killed
    steps = check_buildable(recipe)
    # Fail fast, before any stage starts, naming the endpoint that does not answer (the tracking
    # server first: checking a local root creates it).
    client = None
    if mlflow_uri:
        from pqflow import tracking

        tracking.check_reachable(mlflow_uri)
        client = tracking.configure(mlflow_uri)
    check_reachable(root)
    run_key = uuid.uuid4().hex
    parent = exp_id = None
    if client is not None:
        parent = tracking.start_parent(client, recipe, run_key, root=root, steps=[s.name for s in steps])
        exp_id = tracking.experiment_of(client, parent)
    t0 = time.perf_counter()
    outputs: dict[str, Any] = {}
    results: dict[str, StepResult] = {}
    ok = False
    try:
        with scratch_dir("run") as scratch:
            for step in steps:
                t_step, cpu_step = time.perf_counter(), time.process_time()
                out = run_step(step, recipe, root, outputs, Path(scratch), mlflow_uri=mlflow_uri or "",
                               parent_run=parent or "", run_key=run_key, force=force)
                release_memory()
                outputs[step.name] = out
                pointer = dict(out.metadata)
                res = StepResult(step.name, pointer, read_manifest(pointer["pqflow_uri"]) or {},
                                 time.perf_counter() - t_step, time.process_time() - cpu_step)
                results[step.name] = res
                if on_step:
                    on_step(step.name, res)
        ok = True
        print("[pqflow] step seconds (wall/cpu): " + ", ".join(
            f"{r.step} {r.seconds:.0f}/{r.cpu_seconds:.0f}" for r in results.values()), file=sys.stderr)
    finally:
        seconds = time.perf_counter() - t0
        if client is not None and parent:
            try:
                tracking.end_parent(client, parent, ok, {
                    "pipeline_seconds": seconds,
                    "steps_reused": float(sum(r.skipped for r in results.values())),
                    "steps_run": float(sum(not r.skipped for r in results.values())),
                })
            except Exception as e:  # noqa: BLE001 - do not hide the original failure
                if ok:
                    raise  # every step is published: a re-run reuses them and closes a new parent run
                print(f"[pqflow] warning: could not close the MLflow parent run: {e}", file=sys.stderr)
    registry = {}
    final = results.get("evaluate")
    if final is not None and "registered_model" in final.pointer:
        registry = {k: final.pointer[k] for k in ("registered_model", "model_version", "champion", "gate_reason")
                    if k in final.pointer}
    return RunResult(root, results, seconds, run_key, mlflow_uri, parent, registry, exp_id)
