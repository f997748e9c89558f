"""Stage ``importance``: score decoder layers, heads and MLP channels of a model on calibration data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pqflow.artifacts import Artifact
from pqflow.calibration import Calibration
from pqflow.methods.importance import REGISTRY
from pqflow.methods.importance.common import Scores
from pqflow.methods.importance.plots import plot_scores
from pqflow.recipe import Recipe
from pqflow.stages.common import input_model, write_json

META_FILE = "importance.json"
PLOT_FILE = "importance.png"


def open_calibration(art: Artifact) -> Calibration:
    return Calibration(art.path, json.loads((art.path / "calib.json").read_text()))


def compute(recipe: Recipe, model: Any, calib: Calibration, progress: bool = True) -> tuple[Scores, float]:
    """The recipe's importance method on ``model``; returns the scores and the seconds it took."""
    cfg = recipe.stages.importance
    params = recipe.method_params("importance")
    t0 = time.perf_counter()
    scores = REGISTRY.module(cfg.method).score(model, calib, params, progress=progress)
    scores.method = cfg.method
    return scores, time.perf_counter() - t0


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    loaded = input_model(recipe, inputs, "importance")
    calib = open_calibration(inputs["calib"])
    scores, secs = compute(recipe, loaded.model, calib)
    scores.save(out)
    plot_scores(scores, out / PLOT_FILE)
    layer = scores.layer.tolist()
    meta = {
        "method": scores.method,
        "params": recipe.method_params("importance").model_dump(mode="json"),
        "granularities": scores.granularities(),
        "n_layers": len(layer),
        "layer": layer,
        "layer_order": sorted(range(len(layer)), key=lambda i: layer[i]),
        "seconds": secs,
        "info": scores.info,
    }
    write_json(out / META_FILE, meta)
    print(f"[pqflow] importance: {scores.method} in {secs:.1f}s; least important layers "
          f"{meta['layer_order'][:5]}")
    return {"importance_seconds": secs, "layers": len(layer)}
