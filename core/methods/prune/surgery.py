"""Apply a :class:`PrunePlan` to a model in place: cut the tensors, drop layers, renumber the
KV-cache slots and make the config describe what is left. The cuts themselves are the architecture
adapter's (:func:`pqflow.architectures.cut_heads`, ``cut_channels``, ``drop_layers``), so fused
projections and per-family attention bookkeeping are handled there.

Cut layers stay plain ``nn.Linear`` modules (only smaller), so every later stage (quantization,
LoRA) treats them like any other linear.
"""

from __future__ import annotations

from torch import nn

from pqflow import architectures as arch
from pqflow.architectures import (
    CHANNEL_PRUNING,
    HEAD_PRUNING,
    LAYER_DROPPING,
    decoder_layers,
    geometries,
    geometry,
)
from pqflow.formats.pruned import SHAPES_KEY
from pqflow.methods.prune.plan import LayerKeep, PrunePlan

__all__ = ["SHAPES_KEY", "apply_plan", "cut_layer", "drop_layers", "layer_shapes", "sync_config"]


def cut_layer(layer: nn.Module, keep: LayerKeep) -> None:
    g = geometry(layer)
    # Query heads are ordered by their KV head so repeat_kv pairs them with the right keys.
    heads = sorted(keep.heads, key=lambda h: (h // g.group, h))
    kv = sorted(keep.kv)
    if len(heads) % len(kv) or any(h // g.group not in kv for h in heads):
        raise ValueError(f"kept heads {heads} are not GQA-consistent with KV heads {kv}")
    per = len(heads) // len(kv)
    if any(sum(1 for h in heads if h // g.group == k) != per for k in kv):
        raise ValueError(f"every KV group must keep the same number of query heads, got {heads}")
    # Only what changes is cut: a family that refuses head pruning may still lose MLP channels.
    if len(heads) < g.n_heads or len(kv) < g.n_kv:
        arch.cut_heads(layer, heads, kv)
    if len(keep.channels) < g.inter:
        arch.cut_channels(layer, keep.channels)


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    # The KV cache is indexed by layer_idx: the adapter renumbers so the cache has no holes.
    arch.drop_layers(model, drop)


def layer_shapes(model: nn.Module) -> list[list[int]]:
    return [[g.n_heads, g.n_kv, g.inter] for g in geometries(model)]


def sync_config(model: nn.Module) -> bool:
    """Describe the layers in the config. Returns True when all layers share one shape (a plain
    HF config then says it all); otherwise the per-layer shapes go under ``pqflow_layer_shapes``."""
    cfg = model.config
    geos = geometries(model)
    shapes = layer_shapes(model)
    uniform = all(s == shapes[0] for s in shapes)
    if uniform:
        n_heads, n_kv, inter = shapes[0]
        if getattr(cfg, "head_dim", None) is None:
            # Configs that derive head_dim from hidden / heads would derive a wrong one after a cut.
            cfg.head_dim = geos[0].head_dim
        if geos[0].n_experts:
            inter = cfg.intermediate_size  # an MoE block's width is its experts', which are not cut
        arch.set_config_shape(model, n_heads, n_kv, inter)
        if hasattr(cfg, SHAPES_KEY):
            delattr(cfg, SHAPES_KEY)
    else:
        setattr(cfg, SHAPES_KEY, shapes)
    return uniform


def plan_needs(plan: PrunePlan, model: nn.Module) -> set[str]:
    """The adapter capabilities applying ``plan`` to ``model`` takes."""
    caps = {LAYER_DROPPING} if plan.drop else set()
    layers = decoder_layers(model)
    for i, keep in plan.keep.items():
        g = geometry(layers[i])
        if len(keep.heads) < g.n_heads or len(keep.kv) < g.n_kv:
            caps.add(HEAD_PRUNING)
        if len(keep.channels) < g.inter:
            caps.add(CHANNEL_PRUNING)
    return caps


def apply_plan(model: nn.Module, plan: PrunePlan) -> bool:
    """Cut ``model`` in place. Returns whether its layers are uniform afterwards. A plan the
    model's family cannot take is refused before anything is cut."""
    for cap in sorted(plan_needs(plan, model)):
        arch.require(model, cap)
    layers = decoder_layers(model)
    for i, keep in plan.keep.items():
        cut_layer(layers[i], keep)
    if plan.drop:
        drop_layers(model, plan.drop)
    return sync_config(model)
