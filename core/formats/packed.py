"""``pqflow-quant``: pqflow's packed low-bit layers (codes, scales, zeros in safetensors plus
``quant_config.json``); the layout and the code live in :mod:`pqflow.quant.model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pqflow.formats import get
from pqflow.models import LoadedModel
from pqflow.quant.model import FORMAT, load_quantized, save_quantized

NAME = FORMAT  # "pqflow-quant", also written into quant_config.json
BNB_FORMAT = "pqflow-bnb"


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    return save_quantized(model, tokenizer, out)


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    if meta.get("backend") == "bitsandbytes":
        # Artifacts written before pqflow-bnb existed are transformers' bitsandbytes checkpoints
        # labelled pqflow-quant with a backend field; they hold no packed layers, so hand them to
        # the bitsandbytes format (looked up by name: this layer never imports a method).
        return get(BNB_FORMAT).load(folder, meta)
    return load_quantized(folder, meta)
