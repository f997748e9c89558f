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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pqflow import architectures
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


_PREPARED: dict[type, type] = {}


def prepared_class(config: Any) -> type:
    """The transformers causal-LM class of ``config``, subclassed so that each instance is
    :func:`pqflow.architectures.prepare`-d as soon as it is built, before ``from_pretrained``
    loads (or bitsandbytes quantizes) weights into it: artifacts name MoE experts as prepare
    lays them out. The subclass keeps the class's name, so saved configs name the original."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    cls = _PREPARED.get(base)
    if cls is None:
        def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, config, *args, **kwargs)
            architectures.prepare(self)

        cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__})
        _PREPARED[base] = cls
    return cls


def _targets_present(transform: Any, keys: list[str]) -> bool:
    patterns = [re.compile(re.escape(t).replace(r"\*", ".*")) for t in transform.target_patterns]
    return all(any(p.search(k) for k in keys) for p in patterns)


@contextmanager
def _own_layout() -> Iterator[None]:
    """Inside: ``from_pretrained`` reads a checkpoint in the prepared model's own layout.

    transformers 5 converts the tensors of some checkpoints while loading them (an MoE model
    type's per-expert tensors into its fused 3D experts). The prepared model keeps one linear per
    expert, and pqflow's checkpoints hold exactly those: a conversion into tensors the model does
    not have is dropped (renamings stay; a quantizer still adds its own steps)."""
    import transformers.modeling_utils as mu
    from transformers.core_model_loading import WeightConverter

    original = mu.get_model_conversion_mapping

    def mapping(model: nn.Module, key_mapping: Any = None, hf_quantizer: Any = None, add_legacy: bool = True) -> list:
        keys = list(model.state_dict())
        kept = [t for t in original(model, key_mapping, None, add_legacy)
                if not isinstance(t, WeightConverter) or _targets_present(t, keys)]
        return hf_quantizer.update_weight_conversions(kept, model) if hf_quantizer is not None else kept

    mu.get_model_conversion_mapping = mapping
    try:
        yield
    finally:
        mu.get_model_conversion_mapping = original


def from_pretrained(ref: str | Path, config: Any, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` of :func:`prepared_class` on a checkpoint in the prepared layout,
    safetensors only, never the model's own code; a load error is one line."""
    architectures.family_of(config)  # an unsupported family is refused by name, before any work
    try:
        with _own_layout():
            return prepared_class(config).from_pretrained(str(ref), config=config, use_safetensors=True,
                                                          trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"cannot load model '{ref}': {first}") from None


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
