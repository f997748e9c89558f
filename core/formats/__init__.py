"""On-disk model formats, one module per format, registered by name.

A model artifact is a folder: the model's own files plus ``pqflow_model.json`` whose ``format``
names the module that wrote it and reads it back. Each format module defines

    NAME: str
    save(model, tokenizer, out) -> dict   # writes the files, returns extra model meta
    load(folder, meta) -> LoadedModel     # meta: the parsed pqflow_model.json

Methods and stages name the format they write (a quantize method's ``FORMAT``); nothing here
imports :mod:`pqflow.methods`, so loading a model never pulls in a method's dependencies and the
layering stays methods -> formats -> models/quant (a test scans for it).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pqflow.errors import SourceError
from pqflow.models import MODEL_META, LoadedModel, report

# name -> module; imported lazily so that e.g. peft is imported only for a LoRA artifact.
FORMATS: dict[str, str] = {
    "hf": "pqflow.formats.hf",
    "pqflow-quant": "pqflow.formats.packed",
    "pqflow-bnb": "pqflow.formats.bitsandbytes",
    "pqflow-pruned": "pqflow.formats.pruned",
    "pqflow-lora": "pqflow.formats.lora",
}


def names() -> list[str]:
    return sorted(FORMATS)


def register(name: str, module: str) -> None:
    """Add a format: ``module`` is the import path of a module with NAME, save and load."""
    FORMATS[name] = module


def get(name: Any, where: str | Path = "model format") -> ModuleType:
    """The module of format ``name``; an unknown name is a one-line SourceError listing the known."""
    if not isinstance(name, str) or name not in FORMATS:
        raise SourceError(f"{where}: unknown model format {name!r} (known: {', '.join(names())})")
    return importlib.import_module(FORMATS[name])


def write_meta(out: Path, meta: dict[str, Any]) -> Path:
    """Write ``pqflow_model.json`` (``meta`` holds ``format``) into ``out``; returns ``out``."""
    out = Path(out)
    (out / MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def save_model(model: nn.Module, tokenizer: Any, out: Path, fmt: str = "hf", **meta: Any) -> Path:
    """Write a model artifact's files into ``out`` with format ``fmt``'s saver (the artifact
    store adds the manifest). ``meta`` goes into ``pqflow_model.json`` beside what the saver returns."""
    mod = get(fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = mod.save(model, tokenizer, out) or {}
    return write_meta(out, {**meta, **extra, "format": fmt})


def read_meta(folder: Path) -> dict[str, Any]:
    """The parsed ``pqflow_model.json`` of ``folder`` (a JSON object)."""
    meta_path = Path(folder) / MODEL_META
    if not meta_path.is_file():
        raise SourceError(f"{folder} is not a pqflow model artifact: {MODEL_META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SourceError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise SourceError(f"{meta_path}: not a JSON object")
    return meta


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    """Load ``folder`` with the format ``meta`` names (``hf`` when it names none). Also used for
    the base of a LoRA artifact and for old ``pqflow-quant`` bitsandbytes artifacts."""
    fmt = meta.get("format", "hf")
    return get(fmt, Path(folder) / MODEL_META).load(Path(folder), meta)


def load_model_artifact(folder: Path) -> LoadedModel:
    """Load a verified model artifact folder through its format's loader."""
    meta = read_meta(folder)
    loaded = load(Path(folder), meta)
    loaded.model.eval()
    report(loaded.model, f"{folder} ({meta.get('format', 'hf')})")
    return loaded
