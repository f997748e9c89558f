"""Stage ``calibrate``: seeded token windows from the train split plus per-linear input statistics."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pqflow.artifacts import Artifact
from pqflow.calibration import STATS_FILE, WINDOWS_FILE, collect_stats
from pqflow.data import check_data_unseen, describe, draw_windows, part_texts
from pqflow.recipe import Recipe
from pqflow.stages.common import input_model, write_json


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.calibrate
    # Again here, not only in the recipe check: a file may have been created or replaced since.
    check_data_unseen(recipe, "stages.calibrate.data", "calibration")
    texts = part_texts(cfg.data, "train")  # before the model: bad data fails fast
    loaded = input_model(recipe, inputs, "calibrate")
    drawn = draw_windows(loaded.tokenizer, texts, cfg.n_windows, cfg.seqlen, cfg.seed)
    windows = drawn.windows
    split_tokens = sum(p["split_tokens"] for p in drawn.parts)
    print(f"[pqflow] calibrate: {cfg.n_windows} x {cfg.seqlen} windows of {cfg.data.label} (train split, seed "
          f"{cfg.seed})" + (f": {describe(drawn)}" if len(drawn.parts) > 1 else ""), file=sys.stderr)
    stats, aliases = collect_stats(loaded.model, windows, cfg.batch_size, xtx=cfg.collect_xtx)
    save_file({"input_ids": windows.contiguous()}, out / WINDOWS_FILE)
    save_file(stats, out / STATS_FILE)
    meta = {
        "source": cfg.data.label,
        "mixture": drawn.parts,
        "split": "train",
        "n_windows": cfg.n_windows,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "split_tokens": split_tokens,
        "xtx": cfg.collect_xtx,
        "aliases": aliases,
        "linears": sorted({k.rsplit(".", 1)[0] for k in stats} | set(aliases)),
    }
    write_json(out / "calib.json", meta)
    return {"calib_tokens": int(windows.numel()), "calib_split_tokens": int(split_tokens),
            "linears": len(meta["linears"])}
