"""Helpers the stages share: the model a stage works on, JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqflow.artifacts import Artifact
from pqflow.models import LoadedModel, load_model_artifact, load_source
from pqflow.recipe import Recipe


def input_model(recipe: Recipe, inputs: dict[str, Artifact]) -> LoadedModel:
    """The ``model`` input artifact if given, else the recipe's model source."""
    if "model" in inputs:
        return load_model_artifact(inputs["model"].path)
    return load_source(recipe.model.source, recipe.model.dtype)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))
