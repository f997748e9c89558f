"""Stage ``export``: the final model in the formats listed in ``stages.export.formats``.

Input: ``model`` (the last model artifact of the plan: the one ``evaluate`` registers). Output: one
folder per format, each a complete export artifact of its own (files + ``manifest.json``, written by
:func:`pqflow.export.export_artifact`), so ``<stage uri>/<format>`` opens and verifies on its own on
``file://`` and ``s3://`` alike, plus ``exports.json``, the index of formats, digests and bytes.
The stage's manifest lists every file of every format (nested manifests included), so the whole
export also verifies as one artifact.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from pqflow.artifacts import Artifact
from pqflow.export import ExportOptions, export_artifact
from pqflow.model_exports import INDEX_FILE
from pqflow.recipe import Recipe
from pqflow.stages.common import write_json


def options(recipe: Recipe) -> ExportOptions:
    cfg = recipe.stages.export
    return ExportOptions(fallback=cfg.fallback, dtype=cfg.dtype, uneven=cfg.uneven)


def run(recipe: Recipe, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    cfg = recipe.stages.export
    model = inputs["model"]
    opts = options(recipe)
    index: dict[str, Any] = {}
    summary: dict[str, Any] = {"formats": ",".join(cfg.formats)}
    t0 = time.perf_counter()
    for fmt in cfg.formats:
        # Built inside the stage's staging folder: published (and removed on failure) with the stage.
        res = export_artifact(model.uri, fmt, f"file://{out / fmt}", opts, force=True)
        digest = _digest(out / fmt)
        index[fmt] = {"format": fmt, "path": fmt, "digest": digest, "bytes": res["bytes"], "engines": res.get("engines", []),
                      "summary": {k: v for k, v in res.items() if k not in ("uri", "skipped")}}
        summary[f"bytes.{fmt}"] = res["bytes"]
        print(f"[pqflow] export: {fmt} {res['bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    summary["export_seconds"] = time.perf_counter() - t0
    write_json(out / INDEX_FILE, {"model": {"uri": model.uri, "digest": model.digest},
                                  "options": {"fallback": opts.fallback, "dtype": opts.dtype, "uneven": opts.uneven},
                                  "formats": list(index.values())})  # a list: the recipe's order
    return summary


def _digest(folder: Path) -> str:
    from pqflow.artifacts import read_manifest

    manifest = read_manifest(f"file://{folder}")
    assert manifest is not None  # export_artifact published it just now
    return manifest["digest"]
