"""Stage ``calibrate``: seeded token windows from the train split plus per-linear input statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pqflow.artifacts import Artifact
from pqflow.calibration import STATS_FILE, WINDOWS_FILE, collect_stats
from pqflow.data import check_unseen, load_text, sample_windows, tokenize
from pqflow.recipe import Recipe
from pqflow.stages.common import input_model, write_json


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.calibrate
    # Again here, not only in the recipe check: the file may have been created or replaced since.
    check_unseen(cfg.data.source, recipe.stages.evaluate.data.source, "calibration")
    text = load_text(cfg.data.source, "train", cfg.data.field)  # before the model: bad data fails fast
    loaded = input_model(recipe, inputs, "calibrate")
    ids = tokenize(loaded.tokenizer, text)
    windows = sample_windows(ids, cfg.n_windows, cfg.seqlen, cfg.seed)
    stats, aliases = collect_stats(loaded.model, windows, cfg.batch_size, xtx=cfg.collect_xtx)
    save_file({"input_ids": windows.contiguous()}, out / WINDOWS_FILE)
    save_file(stats, out / STATS_FILE)
    meta = {
        "source": cfg.data.source,
        "split": "train",
        "n_windows": cfg.n_windows,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "split_tokens": ids.numel(),
        "xtx": cfg.collect_xtx,
        "aliases": aliases,
        "linears": sorted({k.rsplit(".", 1)[0] for k in stats} | set(aliases)),
    }
    write_json(out / "calib.json", meta)
    return {"calib_tokens": int(windows.numel()), "calib_split_tokens": int(ids.numel()),
            "linears": len(meta["linears"])}
