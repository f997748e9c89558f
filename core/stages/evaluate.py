"""Stage ``evaluate``: WikiText-2 (or any text) test perplexity, bytes on disk, memory and speed.

Without a ``model`` input the stage measures the recipe's source model: the uncompressed baseline.
Its metrics depend only on the source model, the test text and the protocol, so they are kept in
the pqflow cache under a digest of those three and reused (the log says so) while none changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pqflow import __version__
from pqflow.artifacts import Artifact, canonical_digest
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.models import cache_dir, cast_float, param_count, save_model, source_digest, weight_bytes
from pqflow.perplexity import perplexity
from pqflow.recipe import Recipe
from pqflow.runtime import peak_rss_mb
from pqflow.stages.common import input_model, write_json

METRICS_FILE = "metrics.json"
BASELINE_CACHE = "baselines"
PROTOCOL = 1  # bump when what the stage measures, or how, changes


def baseline_key(recipe: Recipe, text: str, extra: dict[str, str] | None = None) -> str | None:
    """Digest of what the baseline's metrics depend on: the source model (weights, config,
    tokenizer, dtype), the test texts (``extra``: name -> text of ``datasets``) and the protocol;
    None when the source has no digest."""
    cfg = recipe.stages.evaluate
    source = source_digest(recipe.model.source, recipe.model.dtype)
    if source is None:
        return None
    from importlib import metadata

    return canonical_digest({
        "source": source,
        "data": hashlib.sha256(text.encode()).hexdigest(),
        "datasets": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in (extra or {}).items()},
        "protocol": {"version": PROTOCOL, "split": "test", "data": cfg.data.model_dump(mode="json"),
                     "datasets": [d.model_dump(mode="json") for d in cfg.datasets],
                     "seqlen": cfg.seqlen, "max_windows": cfg.max_windows, "batch_size": cfg.batch_size,
                     "device": cfg.device, "dtype": cfg.dtype},
        "versions": {"pqflow": __version__, "torch": torch.__version__, "transformers": metadata.version("transformers")},
    })


def _baseline_file(key: str) -> Path:
    return cache_dir(BASELINE_CACHE) / f"{key}.json"


def cached_baseline(key: str) -> dict[str, Any] | None:
    """The metrics stored under ``key``, or None when absent or unreadable (never trusted blindly:
    the record names its key and carries the digest of its metrics)."""
    path = _baseline_file(key)
    try:
        rec = json.loads(path.read_text())
        metrics = rec["metrics"]
        ok = (rec.get("key") == key and rec.get("digest") == canonical_digest(metrics)
              and isinstance(metrics.get("ppl"), float) and math.isfinite(metrics["ppl"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return metrics if ok else None


def store_baseline(key: str, metrics: dict[str, Any]) -> None:
    """Write the record atomically (a temporary file renamed into place); a cache that cannot be
    written only costs the next run a measurement."""
    path = _baseline_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{key}.", delete=False) as f:
            json.dump({"key": key, "digest": canonical_digest(metrics), "metrics": metrics}, f, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        print(f"[pqflow] evaluate: could not cache the baseline ({e})", file=sys.stderr)


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.evaluate
    text = load_text(cfg.data.source, "test", cfg.data.field, cfg.data.layout)
    extra = {d.name: load_text(d.source, "test", d.field, d.layout) for d in cfg.datasets}
    key = None
    if "model" not in inputs:
        key = baseline_key(recipe, text, extra)
        cached = cached_baseline(key) if key else None
        if cached is not None:
            print(f"[pqflow] evaluate: baseline reused (source model, data and protocol unchanged; "
                  f"{_baseline_file(key)}): ppl {cached['ppl']:.3f}", file=sys.stderr)
            metrics = {**cached, "reused": True}
            write_json(out / METRICS_FILE, metrics)
            return _summary(metrics)
    loaded = input_model(recipe, inputs, "evaluate")
    ids = tokenize(loaded.tokenizer, text)
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
    domains = score_datasets(loaded, recipe, extra)
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
        **{f"{k}_{d['name']}": d[k] for d in domains for k in ("ppl", "nll")},
        "datasets": domains,
    }
    write_json(out / METRICS_FILE, metrics)
    if key is not None:
        store_baseline(key, metrics)
    print(
        f"[pqflow] evaluate: ppl {res.ppl:.3f} on {res.windows} x {cfg.seqlen} tokens of {cfg.data.source}; "
        f"model {model_bytes / 2**20:.1f} MiB on disk; {res.tokens_per_s:.0f} tok/s; peak RSS {metrics['peak_rss_mb']:.0f} MiB"
    )
    for d in domains:
        print(f"[pqflow] evaluate: ppl_{d['name']} {d['ppl']:.3f} on {d['windows']} x {cfg.seqlen} tokens of {d['source']}")
    return _summary(metrics)


def score_datasets(loaded: Any, recipe: Recipe, texts: dict[str, str]) -> list[dict[str, Any]]:
    """Perplexity of each further test text (``stages.evaluate.datasets``) with the primary's protocol."""
    cfg = recipe.stages.evaluate
    out = []
    for d in cfg.datasets:
        windows = eval_windows(tokenize(loaded.tokenizer, texts[d.name]), cfg.seqlen, cfg.max_windows)
        r = perplexity(loaded.model, windows, cfg.batch_size)
        out.append({"name": d.name, "source": d.source, "layout": d.layout, "ppl": r.ppl, "nll": r.nll,
                    "windows": r.windows, "tokens": r.tokens})
    return out


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
