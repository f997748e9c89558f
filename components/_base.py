"""What every stage component does inside its container: call ``pqflow.runner.run_stage``.

A component receives the recipe (JSON text), the artifact root, its step name (from
:func:`pqflow.plan.plan`) and its upstream steps' KFP artifacts. Each KFP artifact is a pointer:
its metadata holds the pqflow artifact URI (``pqflow_uri``) and digest, its file holds a copy of
the pqflow manifest. The real files travel through pqflow's own artifact store (S3 or file://).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

POINTER_KEYS = ("pqflow_uri", "digest", "stage", "step", "skipped", "seconds")


def run_component(stage: str, recipe: str, root: str, step: str, output: Any, inputs: dict[str, Any],
                  mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False) -> dict[str, Any]:
    """Run ``stage`` for ``step``; fill ``output`` (a KFP artifact) with the pointer; return it."""
    from pqflow.artifacts import join
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    rec = parse_recipe(json.loads(recipe), f"recipe of step {step}")
    uris = {}
    for name, art in inputs.items():
        if art is None:
            continue
        uri = (art.metadata or {}).get("pqflow_uri")
        if not uri:
            raise ValueError(f"input '{name}' of step {step} is not a pqflow artifact pointer (no pqflow_uri)")
        uris[name] = uri
    out_uri = join(root, rec.name, step)
    hook = None
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow_uri:
        from pqflow.tracking import StageTracker

        hook = StageTracker(mlflow_uri, rec, root, step, parent_run=parent_run, run_key=run_key)
    outcome = run_stage(stage, rec, uris, out_uri, force=force, on_done=hook)
    pointer: dict[str, Any] = {
        "pqflow_uri": outcome.uri,
        "digest": outcome.manifest["digest"],
        "stage": outcome.stage,
        "step": step,
        "skipped": outcome.skipped,
        "seconds": round(outcome.seconds, 3),
    }
    for k, v in outcome.summary.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            pointer[k] = v
    if hook is not None:
        pointer.update(hook.result)
    output.metadata.update(pointer)
    path = Path(output.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome.manifest, indent=2, sort_keys=True))
    return pointer
