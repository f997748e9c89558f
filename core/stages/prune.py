"""Stage ``prune``: a physically smaller model from importance scores, optionally corrected."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from pqflow.artifacts import Artifact
from pqflow.methods.importance.common import Scores, geometries, non_embedding_params, pick_windows
from pqflow.methods.prune import REGISTRY
from pqflow.methods.prune.correction import correct
from pqflow.methods.prune.format import FORMAT
from pqflow.methods.prune.plots import plot_plan
from pqflow.methods.prune.surgery import apply_plan, layer_shapes
from pqflow.models import param_count, save_model, weight_bytes
from pqflow.recipe import Recipe
from pqflow.stages.common import input_model, write_json
from pqflow.stages.importance import compute, open_calibration

META_FILE = "prune.json"
PLOT_FILE = "prune.png"


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.prune
    params = recipe.method_params("prune")
    loaded = input_model(recipe, inputs, "prune")
    model = loaded.model
    method = REGISTRY.module(cfg.method)
    # Before any scoring: a family that refuses a cut these params ask for fails here, clearly.
    method.check(model, params)
    calib = open_calibration(inputs["calib"])
    t0 = time.perf_counter()
    if "importance" in inputs:
        scores = Scores.load(inputs["importance"].path)
        importance_secs = 0.0
    else:
        scores, importance_secs = compute(recipe, model, calib)
    geos = geometries(model)
    base = non_embedding_params(model)
    params_before = param_count(model)
    target = int(cfg.ratio * base)
    plan = method.plan(geos, scores, target, params)
    plan_json = plan.to_json(geos)
    original = copy.deepcopy(model) if params.correction != "none" else None
    uniform = apply_plan(model, plan)
    t_cut = time.perf_counter() - t0
    report = None
    if original is not None:
        kept = plan.kept_layers(len(geos))
        windows = pick_windows(calib.windows, params.correct_windows)
        report = correct(original, model, kept, set(plan.keep), windows, params)
        del original
    secs = time.perf_counter() - t0
    fmt = "hf" if uniform else FORMAT
    save_model(model, loaded.tokenizer, out, fmt=fmt, pruned_from=str(loaded.source), method=cfg.method)
    removed = base - non_embedding_params(model)
    plot_plan(plan_json, geos, out / PLOT_FILE, f"{cfg.method} {cfg.ratio:.0%} ({scores.method})")
    meta = {
        "method": cfg.method,
        "importance": scores.method,
        "params": params.model_dump(mode="json"),
        "ratio_target": cfg.ratio,
        "ratio_removed": removed / base,
        "non_embedding_before": base,
        "non_embedding_after": base - removed,
        "params_before": params_before,
        "params_after": param_count(model),
        "format": fmt,
        "layer_shapes": layer_shapes(model),
        "plan": plan_json,
        "seconds": {"importance": importance_secs, "cut": t_cut, "total": secs},
        "correction": report.fits if report else [],
    }
    write_json(out / META_FILE, meta)
    bytes_ = weight_bytes(out)
    print(f"[pqflow] prune: {cfg.method} removed {removed / base:.1%} of non-embedding params "
          f"({len(plan.drop)} layers dropped), format {fmt}, {bytes_ / 2**20:.1f} MiB, {secs:.1f}s")
    summary: dict[str, Any] = {
        "ratio_removed": removed / base, "params_after": param_count(model), "model_bytes": bytes_,
        "layers_dropped": len(plan.drop), "prune_seconds": secs,
    }
    if report:
        summary["correction_gain"] = report.mean_gain()
    return summary
