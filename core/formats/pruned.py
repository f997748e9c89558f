"""``pqflow-pruned``: a Hugging Face folder (config.json + safetensors) whose decoder layers have
different head counts or MLP widths, listed in the config under ``pqflow_layer_shapes``.

The loader builds the architecture from the config, shrinks each layer's linears to its listed
shape and loads the safetensors; no pickled modules anywhere. Only the safetensors files the
artifact's manifest lists are read, and the config is sized first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pqflow.architectures import decoder_layers, prepare, shape_layer
from pqflow.formats import hf
from pqflow.model_limits import check_config
from pqflow.models import LoadedModel, config_dtype, load_config, load_tokenizer, weight_bytes, weight_files

NAME = "pqflow-pruned"
SHAPES_KEY = "pqflow_layer_shapes"  # config entry: [[n_heads, n_kv_heads, intermediate], ...] per layer


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    # Files as for hf: the per-layer shapes travel in the config (the prune method sets SHAPES_KEY).
    return hf.save(model, tokenizer, out)


def shape_layers(model: nn.Module, shapes: list[list[int]]) -> None:
    """Give each decoder layer its (n_heads, n_kv_heads, intermediate) shape, weights left empty
    (the adapter's :func:`~pqflow.architectures.shape_layer`; the model must be prepared)."""
    for layer, (nh, nkv, inter) in zip(decoder_layers(model), shapes, strict=True):
        shape_layer(layer, nh, nkv, inter)


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = load_config(folder)
    shapes = getattr(config, SHAPES_KEY, None)
    if shapes is None:
        raise ValueError(f"{folder}/config.json: format {NAME} needs '{SHAPES_KEY}'")
    dtype = config_dtype(config)
    check_config(config, where=str(folder), dtype=dtype, weight_bytes=weight_bytes(folder))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    # Prepared first (MoE experts as linears, blocks tagged with their family), as pqflow saved it.
    prepare(model)
    shape_layers(model, shapes)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder, top_level=True):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not match the pruned shapes "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return LoadedModel(model.eval(), load_tokenizer(folder), str(folder))
