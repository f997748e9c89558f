"""``hf``: a plain Hugging Face folder (config.json, safetensors, tokenizer files). The weights are
those of the prepared model (:func:`pqflow.architectures.prepare`): MoE experts as one linear
each, which the loader's prepared class reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pqflow.formats import from_pretrained
from pqflow.model_limits import check_config
from pqflow.models import (
    LoadedModel,
    config_dtype,
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
    model = from_pretrained(folder, cfg, dtype="auto").eval()
    return LoadedModel(model, load_tokenizer(folder), str(folder))
