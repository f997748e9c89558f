"""Exports: a pqflow model artifact written in a format that an engine outside pqflow loads.

Each format is one module of this package holding ``DESCRIPTION`` (one line), ``ENGINES`` (what
reads it) and ``export(src, out, options) -> dict`` (writes the files into ``out`` and returns a
summary), registered below by name. ``src`` is a verified pqflow model artifact folder; ``out`` is
a staging folder that the artifact store publishes with a manifest (:func:`export_artifact`), so an
export is a verified artifact like every other output and a failed export leaves nothing behind.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pqflow.errors import PqflowError

# format name -> module under pqflow.export
FORMATS: dict[str, str] = {
    "hf-dense": "hf_dense",
    "compressed-tensors": "compressed_tensors",
    "gguf": "gguf",
}

Fallback = Literal["error", "widen", "requant"]
Uneven = Literal["error", "pad", "native"]


class ExportError(PqflowError):
    """The model cannot be written exactly in the asked format (names the layer and the reason)."""


@dataclass(frozen=True)
class ExportOptions:
    """``fallback``: what to do with a layer the format cannot hold exactly: ``error`` (default),
    ``widen`` (a larger type that holds it without loss) or ``requant`` (the nearest type of the
    format, lossy: the export warns and reports the ppl change). ``dtype``: float tensors' dtype.
    ``uneven``: a model pruned to other widths in different layers: ``error`` (default), ``pad``
    (zero rows and columns up to the widest layer: exact and small on disk, but the padded heads and
    channels are computed again) or ``native`` (an architecture that holds per-layer widths where the
    format has one, GGUF's ``deci``; padding in the others)."""

    fallback: Fallback = "error"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    uneven: Uneven = "error"


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise PqflowError(f"unknown export format '{name}' (known: {', '.join(sorted(FORMATS))})")
    return importlib.import_module(f"pqflow.export.{FORMATS[name]}")


def describe_formats() -> dict[str, str]:
    return {name: format_module(name).DESCRIPTION for name in sorted(FORMATS)}


def export_artifact(model_uri: str, fmt: str, out_uri: str, options: ExportOptions | None = None,
                    *, force: bool = False) -> dict[str, Any]:
    """Export the model artifact at ``model_uri`` as ``fmt`` to ``out_uri`` (a verified artifact)."""
    from pqflow import __version__
    from pqflow.artifacts import canonical_digest, check_destination, open_artifact, produce
    from pqflow.models import MODEL_META

    options = options or ExportOptions()
    mod = format_module(fmt)
    check_destination(out_uri, {"model": model_uri})
    src = open_artifact(model_uri)
    if not (src.path / MODEL_META).is_file():
        raise PqflowError(f"{model_uri} is not a model artifact (no {MODEL_META}); export takes a model")
    params = {"format": fmt, "fallback": options.fallback, "dtype": options.dtype, "uneven": options.uneven}
    fp = canonical_digest({"stage": "export", "params": params, "inputs": {"model": src.digest},
                           "pqflow": __version__})

    def build(work: Path) -> dict[str, Any]:
        return {"format": fmt, "engines": list(mod.ENGINES), **(mod.export(src.path, work, options) or {})}

    manifest, reused = produce("export", out_uri, fp, params, {"model": src}, build, force=force,
                                announce=False)
    return {"uri": out_uri, "skipped": reused, **manifest.get("summary", {}), "bytes": manifest["bytes"]}
