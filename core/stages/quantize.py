"""Stage ``quantize``: a model artifact whose weights are stored in low bits.

Inputs: ``model`` (else the recipe's source), ``calib`` (its windows feed GPTQ / MREM; without
it windows are drawn as the calibrate stage would), ``allocation`` (``allocation.json`` from
bit-search: per-module bits / group size overriding the recipe's defaults).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pqflow import formats
from pqflow.artifacts import Artifact
from pqflow.calibration import WINDOWS_FILE, Calibration
from pqflow.data import mixture_windows
from pqflow.devices import resolve_device
from pqflow.methods.quant import REGISTRY
from pqflow.methods.quant.plan import read_allocation, resolve_plan
from pqflow.models import param_count, weight_bytes
from pqflow.quant.model import FORMAT, quantize_embeddings, quantized_modules
from pqflow.quant.report import folder_tensor_sizes, module_bytes
from pqflow.recipe import Recipe
from pqflow.runtime import peak_rss_mb
from pqflow.stages.common import input_model, write_json

REPORT_FILE = "quant_report.json"


def calibration_windows(recipe: Recipe, inputs: dict[str, Artifact], tokenizer: Any) -> torch.Tensor:
    if "calib" in inputs:
        art = inputs["calib"]
        if not (art.path / WINDOWS_FILE).is_file():
            raise ValueError(f"calib artifact {art.uri} has no {WINDOWS_FILE}")
        return Calibration(art.path, json.loads((art.path / "calib.json").read_text())).windows
    cal = recipe.stages.calibrate
    print(f"[pqflow] quantize: no calib input; drawing {cal.n_windows} x {cal.seqlen} windows from "
          f"{cal.data.label} (train split, seed {cal.seed})", file=sys.stderr)
    return mixture_windows(tokenizer, cal.data, "train", cal.n_windows, cal.seqlen, cal.seed)


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.quantize
    mod = REGISTRY.module(cfg.method)
    params = recipe.method_params("quantize")
    # Methods that onload (ONLOADS) keep the weights in CPU memory and move one block at a time to
    # the stage's device; the others get the whole model on the device.
    onloads = getattr(mod, "ONLOADS", False)
    loaded = input_model(recipe, inputs, "quantize", place_on_device=not onloads)
    model = loaded.model
    allocation = read_allocation(inputs["allocation"].path) if "allocation" in inputs else None
    plan = resolve_plan(model, cfg.bits, cfg.group_size, cfg.symmetric, allocation)
    n_params = param_count(model)
    windows = calibration_windows(recipe, inputs, loaded.tokenizer) if getattr(mod, "NEEDS_CALIBRATION", False) else None
    t0 = time.perf_counter()
    model = mod.quantize(model, windows, plan, params, **({"device": resolve_device(cfg.device)} if onloads else {}))
    seconds = time.perf_counter() - t0
    fmt = getattr(mod, "FORMAT", FORMAT)  # each method names the model format it writes
    if getattr(mod, "QUANTIZES_EMBEDDINGS", True):
        quantize_embeddings(model, cfg.embedding_bits, cfg.lm_head_bits, cfg.group_size, cfg.symmetric)
    elif cfg.embedding_bits is not None or cfg.lm_head_bits is not None:
        raise ValueError(f"stages.quantize.embedding_bits/lm_head_bits: not supported by method '{cfg.method}' "
                         f"(it writes {fmt})")
    formats.save_model(model, loaded.tokenizer, out, fmt, method=cfg.method)
    report = bytes_report(model, out, plan, n_params)
    report.update(method=cfg.method, seconds=seconds, peak_rss_mb=peak_rss_mb(),
                  plan={k: v.to_dict() for k, v in plan.items()},
                  errors=getattr(model, "quant_errors", {}))
    write_json(out / REPORT_FILE, report)
    print(f"[pqflow] quantize: {cfg.method}, {report['quantized_linears']} linears at "
          f"{report['avg_bits']:.2f} bits/weight (incl. scales/zeros); model {report['model_bytes'] / 2**20:.1f} MiB "
          f"on disk ({report['bytes_per_param']:.3f} B/param) in {seconds:.0f}s", file=sys.stderr)
    return {k: v for k, v in report.items() if isinstance(v, int | float)}


def bytes_report(model: torch.nn.Module, out: Path, plan: dict, n_params: int) -> dict[str, Any]:
    """Sizes read back from the written files: totals, bytes/param, average bits of the
    quantized linears including scale and zero overhead."""
    sizes = folder_tensor_sizes(out)
    qmods = sorted(quantized_modules(model)) or sorted(plan)
    q_bytes = module_bytes(sizes, qmods)
    q_weights = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                    for n in qmods if hasattr(model.get_submodule(n), "in_features"))
    total = weight_bytes(out)
    return {
        "model_bytes": total,
        "bytes_per_param": total / n_params,
        "params": n_params,
        "quantized_linears": len(qmods),
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
        "avg_bits": 8 * q_bytes / max(q_weights, 1),
        "fp16_ratio": q_bytes / max(2 * q_weights, 1),
    }
