"""Stage ``bit-search``: a per-module precision allocation under a byte budget.

Inputs: ``calib`` (windows and activation statistics), optionally ``model`` (else the recipe's
source) and ``importance`` (per-layer scores for the ``importance`` prior). The objective is
measured on held-out tokens of the calibration data source (never its test split).

Outputs: ``allocation.json`` (the chosen allocation, read by ``quantize``), ``trials.json`` (every
measured allocation), ``pareto.json`` + ``pareto.png`` (bytes vs objective), ``bits_heatmap.png``
(bits per layer and linear beside the prior's layer scores) and ``search.json`` (settings, prior
scores, timings).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pqflow.artifacts import Artifact
from pqflow.calibration import Calibration
from pqflow.data import mixture_eval_windows
from pqflow.errors import PqflowError, RecipeError
from pqflow.methods.bitsearch import REGISTRY
from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.evaluator import Evaluator, WeightFn
from pqflow.methods.bitsearch.fakequant import weight_fn_for
from pqflow.methods.bitsearch.plots import bits_heatmap, pareto_plot
from pqflow.methods.bitsearch.space import SearchSpace, parse_choice
from pqflow.methods.bitsearch.targets import TARGETS
from pqflow.recipe import Recipe
from pqflow.runtime import peak_rss_mb
from pqflow.stages.common import input_model, write_json

IMPORTANCE_SCORES = "scores.safetensors"


def open_calibration(art: Artifact) -> Calibration:
    meta_path = art.path / "calib.json"
    if not meta_path.is_file():
        raise PqflowError(f"calib artifact {art.uri} has no calib.json")
    return Calibration(art.path, json.loads(meta_path.read_text()))


def importance_scores(art: Artifact | None) -> np.ndarray | None:
    """Per-layer scores (higher = more important) of an ``importance`` artifact."""
    if art is None:
        return None
    path = art.path / IMPORTANCE_SCORES
    if not path.is_file():
        raise PqflowError(f"importance artifact {art.uri} has no {IMPORTANCE_SCORES}")
    t = load_file(path)
    if "layer" not in t:
        raise PqflowError(f"{path}: no 'layer' scores")
    return t["layer"].double().numpy()


def heldout_windows(recipe: Recipe, tokenizer: Any) -> torch.Tensor:
    cfg, data = recipe.stages.bit_search, recipe.stages.calibrate.data
    return mixture_eval_windows(tokenizer, data, "heldout", cfg.heldout_seqlen, cfg.heldout_windows)


def build_space(recipe: Recipe, model: torch.nn.Module) -> SearchSpace:
    """The recipe's choices that its serving target runs, with the target's fused linears tied."""
    cfg = recipe.stages.bit_search
    target = TARGETS[cfg.target]
    choices, _ = target.allowed([parse_choice(c) for c in cfg.choices], cfg.symmetric)
    return SearchSpace.build(model, cfg.granularity, choices, cfg.symmetric, tie=target.tie(model))


def target_info(recipe: Recipe, space: SearchSpace) -> dict[str, Any]:
    """The serving target, the recipe's choices it refused (and why) and the linears it tied."""
    cfg = recipe.stages.bit_search
    _, refused = TARGETS[cfg.target].allowed([parse_choice(c) for c in cfg.choices], cfg.symmetric)
    tied = [u for u, mods in zip(space.units, space.unit_modules, strict=True) if len(mods) > 1]
    return {"name": cfg.target, "refused": refused, "tied_units": len(tied) if cfg.granularity == "linear" else 0}


def fake_quantizer(recipe: Recipe, calib: Calibration | None) -> tuple[WeightFn, str]:
    """Trials quantize with the quantize stage's method and params (see :mod:`.fakequant`)."""
    q = recipe.stages.quantize
    return weight_fn_for(q.method, recipe.method_params("quantize"), calib)


def worker_evaluator(recipe_json: dict[str, Any], model_dir: str | None, calib_dir: str | None,
                     heldout: torch.Tensor) -> Evaluator:
    """Builds a search evaluator inside a worker process (picklable through ``partial``)."""
    from pqflow.models import load_model_artifact, load_source
    from pqflow.recipe import Recipe

    recipe = Recipe.model_validate(recipe_json)
    model = (load_model_artifact(Path(model_dir)) if model_dir else load_source(recipe.model.source, recipe.model.dtype)).model
    calib = Calibration(Path(calib_dir), json.loads((Path(calib_dir) / "calib.json").read_text())) if calib_dir else None
    cfg = recipe.stages.bit_search
    return Evaluator(model, build_space(recipe, model), heldout, cfg.objective, fake_quantizer(recipe, calib)[0],
                     cache_mb=cfg.cache_mb)


def write_outputs(ctx: SearchContext, best: Any, method: str, out: Path, seconds: float) -> dict[str, Any]:
    space, trials = ctx.space, ctx.trials
    front = trials.pareto()
    extra = {"method": method, "target": ctx.info.get("target", {}).get("name", "any"), "objective": ctx.objective, "objective_value": best.objective,
             "heldout_ppl": float(np.exp(best.nll)), "budget_bytes": ctx.budget, "trial": best.index}
    write_json(out / "allocation.json", space.allocation_json(best.alloc, **extra))
    write_json(out / "trials.json", {"objective": ctx.objective, "budget_bytes": ctx.budget,
                                     "units": space.units, "choices": [c.label for c in space.choices],
                                     "trials": [t.to_json(space) for t in trials.records]})
    write_json(out / "pareto.json", {"objective": ctx.objective, "front": [t.to_json(space) for t in front]})
    pareto_plot(trials.records, front, best, ctx.budget, ctx.objective, out / "pareto.png")
    prior = ctx.info.get("prior")
    scores = ctx._weights.get(prior) if prior else None
    bits_heatmap(space, best.alloc, ctx.layer_names(), scores, f"layer weight ({prior})" if prior else "",
                 out / "bits_heatmap.png")
    search = {"method": method, "info": ctx.info, "timings": ctx.timings, "seconds": seconds,
              "fp_nll": ctx.evaluator.fp_nll, "layer_weights": {k: v.tolist() for k, v in ctx._weights.items()},
              "choice_bytes": {c.label: int(ctx.space.cost[:, i].sum()) for i, c in enumerate(space.choices)}}
    write_json(out / "search.json", search)
    return {"bytes": best.bytes, "avg_bits": best.avg_bits, "budget_bytes": ctx.budget,
            "objective": best.objective, "heldout_ppl": float(np.exp(best.nll)), "trials": len(trials),
            "pareto_points": len(front), "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.bit_search
    if (cfg.avg_bits is None) == (cfg.budget_bytes is None):
        raise RecipeError("stages.bit_search: give exactly one of avg_bits and budget_bytes")
    params = recipe.method_params("bit_search")
    method = REGISTRY.module(cfg.method)
    t0 = time.perf_counter()
    loaded = input_model(recipe, inputs, "bit_search")
    calib = open_calibration(inputs["calib"])
    space = build_space(recipe, loaded.model)
    budget = space.budget(cfg.avg_bits, cfg.budget_bytes)
    heldout = heldout_windows(recipe, loaded.tokenizer)
    model_dir = str(inputs["model"].path) if "model" in inputs else None
    weight_fn, fq_name = fake_quantizer(recipe, calib)
    ctx = SearchContext(
        loaded.model, space, budget, heldout, calib=calib,
        importance=partial(importance_scores, inputs.get("importance")), objective=cfg.objective,
        weight_fn=weight_fn, seed=cfg.seed, cache_mb=cfg.cache_mb,
        worker_factory=partial(worker_evaluator, recipe.model_dump(mode="json"), model_dir,
                               str(inputs["calib"].path), heldout),
    )
    ctx.info["fake_quant"] = fq_name
    ctx.info["target"] = target_info(recipe, space)
    if ctx.info["target"]["refused"]:
        print(f"[pqflow] bit-search: target {cfg.target} drops {ctx.info['target']['refused']}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    print(f"[pqflow] bit-search: {cfg.method}, {space.n_units} {cfg.granularity} units x "
          f"{len(space.choices)} choices, budget {budget} B ({8 * budget / space.n_weights:.3f} bits); objective on "
          f"{len(heldout)} x {heldout.shape[1]} held-out tokens of {recipe.stages.calibrate.data.label}", file=sys.stderr)
    best = method.search(ctx, params)
    return write_outputs(ctx, best, cfg.method, out, time.perf_counter() - t0)
