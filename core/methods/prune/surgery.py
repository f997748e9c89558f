"""Apply a :class:`PrunePlan` to a Llama-style model in place: cut the tensors, drop layers,
renumber the KV-cache slots and make the config describe what is left.

Cut layers stay plain ``nn.Linear`` modules (only smaller), so every later stage (quantization,
LoRA) treats them like any other linear.
"""

from __future__ import annotations

import torch
from torch import nn

from pqflow.formats.pruned import SHAPES_KEY
from pqflow.methods.importance.common import decoder_layers, layer_geometry
from pqflow.methods.prune.plan import LayerKeep, PrunePlan


def _cut(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    b = lin.bias.data if lin.bias is not None else None
    if b is not None and rows is not None:
        b = b.index_select(0, rows)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=lin.bias.requires_grad)
    return new


def _rows_of(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def cut_layer(layer: nn.Module, keep: LayerKeep) -> None:
    g = layer_geometry(layer)
    attn, mlp = layer.self_attn, layer.mlp
    # Query heads are ordered by their KV head so repeat_kv pairs them with the right keys.
    heads = sorted(keep.heads, key=lambda h: (h // g.group, h))
    kv = sorted(keep.kv)
    if len(heads) % len(kv) or any(h // g.group not in kv for h in heads):
        raise ValueError(f"kept heads {heads} are not GQA-consistent with KV heads {kv}")
    per = len(heads) // len(kv)
    if any(sum(1 for h in heads if h // g.group == k) != per for k in kv):
        raise ValueError(f"every KV group must keep the same number of query heads, got {heads}")
    q_rows, kv_rows = _rows_of(heads, g.head_dim), _rows_of(kv, g.head_dim)
    attn.q_proj = _cut(attn.q_proj, rows=q_rows)
    attn.k_proj = _cut(attn.k_proj, rows=kv_rows)
    attn.v_proj = _cut(attn.v_proj, rows=kv_rows)
    attn.o_proj = _cut(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = per
    ch = torch.tensor(sorted(keep.channels))
    mlp.gate_proj = _cut(mlp.gate_proj, rows=ch)
    mlp.up_proj = _cut(mlp.up_proj, rows=ch)
    mlp.down_proj = _cut(mlp.down_proj, cols=ch)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(ch)


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    layers = decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    model.model.layers = nn.ModuleList(kept)
    # The KV cache is indexed by layer_idx: renumber so the cache has no holes.
    for j, layer in enumerate(kept):
        layer.self_attn.layer_idx = j
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = j
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)


def layer_shapes(model: nn.Module) -> list[list[int]]:
    return [[g.n_heads, g.n_kv, g.inter] for g in map(layer_geometry, decoder_layers(model))]


def sync_config(model: nn.Module) -> bool:
    """Describe the layers in the config. Returns True when all layers share one shape (a plain
    HF config then says it all); otherwise the per-layer shapes go under ``pqflow_layer_shapes``."""
    cfg = model.config
    shapes = layer_shapes(model)
    uniform = all(s == shapes[0] for s in shapes)
    if uniform:
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = shapes[0]
        if hasattr(cfg, SHAPES_KEY):
            delattr(cfg, SHAPES_KEY)
    else:
        setattr(cfg, SHAPES_KEY, shapes)
    return uniform


def apply_plan(model: nn.Module, plan: PrunePlan) -> bool:
    """Cut ``model`` in place. Returns whether its layers are uniform afterwards."""
    layers = decoder_layers(model)
    for i, keep in plan.keep.items():
        cut_layer(layers[i], keep)
    if plan.drop:
        drop_layers(model, plan.drop)
    return sync_config(model)
