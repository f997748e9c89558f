"""Stage ``evaluate``: WikiText-2 (or any text) test perplexity, bytes on disk, memory and speed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pqflow.artifacts import Artifact
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.models import cast_float, param_count, save_model, weight_bytes
from pqflow.perplexity import perplexity
from pqflow.recipe import Recipe
from pqflow.runtime import peak_rss_mb
from pqflow.stages.common import input_model, write_json

METRICS_FILE = "metrics.json"


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.evaluate
    loaded = input_model(recipe, inputs)
    ids = tokenize(loaded.tokenizer, load_text(cfg.data.source, "test", cfg.data.field))
    windows = eval_windows(ids, cfg.seqlen, cfg.max_windows)
    res = perplexity(loaded.model, windows, cfg.batch_size)
    if "model" in inputs:
        model_bytes = weight_bytes(inputs["model"].path)
        artifact_bytes = int(inputs["model"].manifest["bytes"])
        model_uri = inputs["model"].uri
    else:
        # A source model has no artifact yet: save it as the fp16 checkpoint that compressed
        # models are compared with, and measure that file.
        with tempfile.TemporaryDirectory(prefix="pqflow-eval-") as tmp:
            save_model(cast_float(loaded.model, torch.float16), loaded.tokenizer, Path(tmp))
            model_bytes = weight_bytes(Path(tmp))
            artifact_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        model_uri = recipe.model.source
    metrics = {
        "ppl": res.ppl,
        "nll": res.nll,
        "eval_windows": res.windows,
        "eval_tokens": res.tokens,
        "seqlen": cfg.seqlen,
        "data": cfg.data.source,
        "model_bytes": model_bytes,
        "artifact_bytes": artifact_bytes,
        "params": param_count(loaded.model),
        "tokens_per_s": res.tokens_per_s,
        "eval_seconds": res.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "model": model_uri,
    }
    write_json(out / METRICS_FILE, metrics)
    print(
        f"[pqflow] evaluate: ppl {res.ppl:.3f} on {res.windows} x {cfg.seqlen} tokens of {cfg.data.source}; "
        f"model {model_bytes / 2**20:.1f} MiB on disk; {res.tokens_per_s:.0f} tok/s; peak RSS {metrics['peak_rss_mb']:.0f} MiB"
    )
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}
