"""Helpers the stages share: the model a stage works on, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pqflow.artifacts import Artifact
from pqflow.devices import place
from pqflow.models import LoadedModel, load_model_artifact, load_source
from pqflow.recipe import Recipe


def input_model(recipe: Recipe, inputs: dict[str, Artifact], stage: str | None = None,
                place_on_device: bool = True) -> LoadedModel:
    """The ``model`` input artifact if given, else the recipe's model source; moved to ``stage``'s
    device and compute dtype (recipe ``stages.<stage>.device`` / ``dtype``) unless the stage
    places the model itself (block-wise onloading keeps the weights on the CPU)."""
    if "model" in inputs:
        loaded = load_model_artifact(inputs["model"].path)
    else:
        loaded = load_source(recipe.model.source, recipe.model.dtype)
    if stage is not None:
        cfg = recipe.stage(stage)
        dev = place(loaded.model, cfg.device if place_on_device else "cpu", cfg.dtype)
        if dev.type != "cpu":
            print(f"[pqflow] {stage}: computing on {dev}", file=sys.stderr)
    return loaded


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))
