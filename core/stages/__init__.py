"""The eight pipeline stages. Each stage module exposes

    run(recipe, inputs, out) -> summary

where ``inputs`` maps input names to verified :class:`~pqflow.artifacts.Artifact` objects,
``out`` is an empty local folder to fill, and ``summary`` is a flat dict of metrics recorded in
the manifest (and in MLflow by the orchestration). Stages know nothing of URIs, S3 or KFP.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqflow.errors import PqflowError


@dataclass(frozen=True)
class StageSpec:
    name: str  # command-line name
    key: str  # recipe key under ``stages``
    module: str
    inputs: tuple[str, ...] = ()  # required inputs
    optional: tuple[str, ...] = ()  # inputs used when given (``model`` falls back to the recipe's source)
    output: str = "model"  # what downstream stages call this stage's artifact
    # Optional inputs that only ride along to the stage's tracking hook (evaluate hands the export to
    # the registry): they do not change the stage's own output, so they stay out of its fingerprint.
    attached: tuple[str, ...] = ()

    def runner(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("calibrate", "calibrate", "pqflow.stages.calibrate", (), ("model",), "calib"),
        StageSpec("importance", "importance", "pqflow.stages.importance", ("calib",), ("model",), "importance"),
        StageSpec("prune", "prune", "pqflow.stages.prune", ("calib",), ("model", "importance"), "model"),
        StageSpec("bit-search", "bit_search", "pqflow.stages.bit_search", ("calib",), ("model", "importance"), "allocation"),
        StageSpec("quantize", "quantize", "pqflow.stages.quantize", (), ("model", "calib", "allocation"), "model"),
        StageSpec("finetune", "finetune", "pqflow.stages.finetune", (), ("model",), "model"),
        StageSpec("export", "export", "pqflow.stages.export", ("model",), (), "export"),
        StageSpec("evaluate", "evaluate", "pqflow.stages.evaluate", (), ("model", "export"), "metrics", ("export",)),
    )
}
BY_KEY = {s.key: s for s in STAGES.values()}


def get_stage(name: str) -> StageSpec:
    spec = STAGES.get(name) or BY_KEY.get(name)
    if spec is None:
        raise PqflowError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    return spec


def stage_available(spec: StageSpec) -> bool:
    return importlib.util.find_spec(spec.module) is not None


