"""Stage ``finetune``: recovery fine-tuning of a (pruned, quantized) model.

Input ``model`` (else the recipe's source). Output: a model artifact (``pqflow-lora`` for LoRA,
``pqflow-quant`` for PEQA, see the methods), ``loss_curve.json`` (every step's loss and learning
rate, every validation perplexity), ``loss_curve.png`` and ``train_metrics.json``. With
``verify_reload`` the written artifact is loaded back and its logits compared with the in-memory
model's, so a format bug fails the stage instead of a later evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from pqflow.artifacts import Artifact
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.methods.tuning import REGISTRY
from pqflow.methods.tuning.common import Base
from pqflow.methods.tuning.plots import plot_history
from pqflow.methods.tuning.train import TrainData
from pqflow.models import MODEL_META, load_model_artifact, load_source, param_count, weight_bytes
from pqflow.recipe import Recipe
from pqflow.stages.common import write_json

CURVE_FILE = "loss_curve.json"
PLOT_FILE = "loss_curve.png"
METRICS_FILE = "train_metrics.json"


def load_base(recipe: Recipe, inputs: dict[str, Artifact]) -> Base:
    if "model" in inputs:
        folder = inputs["model"].path
        loaded = load_model_artifact(folder)
        return Base(loaded.model, loaded.tokenizer, json.loads((folder / MODEL_META).read_text()), folder)
    loaded = load_source(recipe.model.source, recipe.model.dtype)
    return Base(loaded.model, loaded.tokenizer, {"format": "hf"}, None)


def train_data(recipe: Recipe, tokenizer: Any, seqlen: int, n_heldout: int) -> TrainData:
    cfg = recipe.stages.finetune.data
    train_ids = tokenize(tokenizer, load_text(cfg.source, "train", cfg.field))
    held_ids = tokenize(tokenizer, load_text(cfg.source, "heldout", cfg.field))
    return TrainData(train_ids, eval_windows(held_ids, seqlen, n_heldout))


@torch.no_grad()
def reload_diff(model: torch.nn.Module, folder: Path, window: torch.Tensor) -> float:
    """Largest absolute logit difference between ``model`` and the artifact in ``folder``."""
    again = load_model_artifact(folder).model
    a = model(input_ids=window, use_cache=False).logits.float()
    b = again(input_ids=window, use_cache=False).logits.float()
    return float((a - b).abs().max())


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.finetune
    mod = REGISTRY.module(cfg.method)
    params = recipe.method_params("finetune")
    if params.device == "auto" and cfg.device != "auto":
        params = params.model_copy(update={"device": cfg.device})  # the stage's device, unless the method names one
    base = load_base(recipe, inputs)
    if cfg.dtype is not None:
        from pqflow.models import DTYPES, cast_float

        cast_float(base.model, DTYPES[cfg.dtype])
    in_bytes = weight_bytes(base.folder) if base.folder is not None else None
    data = train_data(recipe, base.tokenizer, params.seqlen, params.eval_windows)
    total_params = param_count(base.model)
    tuned = mod.tune(base, data, params, out)
    hist = tuned.history
    write_json(out / CURVE_FILE, hist.to_dict())
    plot_history(hist, out / PLOT_FILE, f"{cfg.method}: {tuned.trainable_params:,} trainable params")
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "trainable_params": tuned.trainable_params,
        "trainable_fraction": tuned.trainable_params / max(1, total_params),
        "steps": hist.steps_done,
        "stopped": hist.stopped,
        "train_tokens": hist.tokens,
        "train_seconds": hist.seconds,
        "final_train_loss": hist.final_loss,
        "val_ppl_before": hist.initial_ppl,
        "val_ppl_best": hist.best_ppl,
        "best_step": hist.best_step,
        "peak_rss_mb": hist.peak_rss_mb,
        "model_bytes": weight_bytes(out),
        **({"input_bytes": in_bytes} if in_bytes is not None else {}),
        **({"peak_gpu_mb": hist.peak_gpu_mb} if hist.peak_gpu_mb is not None else {}),
        **{k: v for k, v in tuned.info.items() if isinstance(v, int | float | str | bool)},
    }
    if cfg.verify_reload:
        diff = reload_diff(tuned.model, out, data.heldout[:1])
        metrics["reload_max_abs_logit_diff"] = diff
        if diff > cfg.reload_tolerance:
            raise RuntimeError(f"finetune: the saved artifact reloads with logits off by {diff:.3g} "
                               f"(> stages.finetune.reload_tolerance {cfg.reload_tolerance})")
    write_json(out / METRICS_FILE, metrics)
    print(f"[pqflow] finetune: {cfg.method}, {hist.steps_done} steps in {hist.seconds:.0f}s; validation ppl "
          f"{hist.initial_ppl:.3f} -> {hist.best_ppl:.3f} (best @ step {hist.best_step}); "
          f"{tuned.trainable_params:,} trainable params; peak RSS {hist.peak_rss_mb:.0f} MiB; "
          f"model {metrics['model_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
