"""Run a recipe's whole plan in this process, stage after stage, against an artifact root."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pqflow.artifacts import check_reachable
from pqflow.plan import plan
from pqflow.recipe import Recipe
from pqflow.runner import StageOutcome, run_stage


@dataclass
class RunResult:
    root: str
    outcomes: dict[str, StageOutcome]
    seconds: float


def run_plan(recipe: Recipe, root: str | None = None, *, force: bool = False,
             on_done: Callable[[str, StageOutcome], None] | None = None) -> RunResult:
    root = root or recipe.storage.root
    check_reachable(root)
    t0 = time.perf_counter()
    outcomes: dict[str, StageOutcome] = {}
    steps = plan(recipe)
    for step in steps:
        uris = {name: outcomes[src].uri for name, src in step.inputs.items()}
        outcome = run_stage(step.stage, recipe, uris, step.uri(root, recipe), force=force)
        outcomes[step.name] = outcome
        if on_done:
            on_done(step.name, outcome)
    return RunResult(root, outcomes, time.perf_counter() - t0)
