"""``hf``: a plain Hugging Face folder (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pqflow.model_limits import check_config
from pqflow.models import (
    LoadedModel,
    config_dtype,
    hf_from_pretrained,
    load_config,
    load_tokenizer,
    require_safetensors,
    weight_bytes,
)

NAME = "hf"


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {}


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    folder = Path(folder)
    require_safetensors(folder)
    cfg = load_config(folder)
    check_config(cfg, where=str(folder), dtype=config_dtype(cfg), weight_bytes=weight_bytes(folder))
    model = hf_from_pretrained(folder, cfg, "auto").eval()
    return LoadedModel(model, load_tokenizer(folder), str(folder))
