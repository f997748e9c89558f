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

from pqflow.formats import hf
from pqflow.model_limits import check_config
from pqflow.models import LoadedModel, config_dtype, load_config, load_tokenizer, weight_bytes, weight_files

NAME = "pqflow-pruned"
SHAPES_KEY = "pqflow_layer_shapes"  # config entry: [[n_heads, n_kv_heads, intermediate], ...] per layer


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    # Files as for hf: the per-layer shapes travel in the config (the prune method sets SHAPES_KEY).
    return hf.save(model, tokenizer, out)


def _resize(lin: nn.Linear, d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=lin.bias is not None, dtype=lin.weight.dtype, device="meta")


def shape_layers(model: nn.Module, shapes: list[list[int]]) -> None:
    """Give each decoder layer its (n_heads, n_kv_heads, intermediate) shape, weights left empty."""
    layers = getattr(model, "model", model).layers  # Llama-style; load_config admitted the architecture
    for layer, (nh, nkv, inter) in zip(layers, shapes, strict=True):
        a, m = layer.self_attn, layer.mlp
        hd, hidden = a.head_dim, a.q_proj.in_features
        a.q_proj = _resize(a.q_proj, hidden, nh * hd)
        a.k_proj = _resize(a.k_proj, hidden, nkv * hd)
        a.v_proj = _resize(a.v_proj, hidden, nkv * hd)
        a.o_proj = _resize(a.o_proj, nh * hd, hidden)
        a.num_key_value_groups = nh // nkv
        m.gate_proj = _resize(m.gate_proj, hidden, inter)
        m.up_proj = _resize(m.up_proj, hidden, inter)
        m.down_proj = _resize(m.down_proj, inter, hidden)
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = inter


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
