"""First-order Taylor importance of coupled structures (LLM-Pruner, QPruner).

One backward pass of the calibration loss gives ``∂L/∂W``. The loss change when a group of weights
is zeroed is estimated per weight (element-wise, ``|w · ∂L/∂w|``) or per group (vector-wise,
``|Σ w · ∂L/∂w|``). A group couples the slices that must go together: a query head is the q
projection's rows and the output projection's columns of that head; a GQA group adds its KV head's
k and v rows; an MLP channel is a row of gate, a row of up and a column of down. The per-slice
values are combined across the coupled slices with ``aggregation`` (sum, mean or max).

Roles come from :func:`pqflow.architectures.projections`, so fused projections (a row slice of one
linear) are scored like separate ones. An MoE block gets a layer score (its experts' weights
included; an expert no calibration token reached has no gradient and counts zero) and head scores;
its channels, inside experts, are not scored.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow import architectures as arch
from pqflow.calibration import Calibration
from pqflow.methods.importance.common import (
    LayerGeometry,
    Scores,
    batches,
    decoder_layers,
    pick_windows,
)
from pqflow.recipe import MAX_BATCH, MAX_WINDOWS


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["element", "vector"] = Field("element", description="|w·g| per weight, or |Σ w·g| per slice")
    aggregation: Literal["sum", "mean", "max"] = Field("sum", description="combines the coupled slices of a group")
    n_windows: int | None = Field(16, ge=1, le=MAX_WINDOWS, description="calibration windows for the gradient (LLM-Pruner uses ~10)")
    batch_size: int = Field(2, ge=1, le=MAX_BATCH)


def _agg(stack: torch.Tensor, how: str) -> torch.Tensor:
    """Combine coupled slices, stacked on the last dimension."""
    if how == "sum":
        return stack.sum(-1)
    if how == "mean":
        return stack.mean(-1)
    return stack.amax(-1)


def _slice_scores(w: torch.Tensor, g: torch.Tensor, dim: int, variant: str) -> torch.Tensor:
    """One value per row (dim=1 reduces over inputs) or per column (dim=0)."""
    p = w.double() * g.double()
    return p.abs().sum(dim) if variant == "element" else p.sum(dim).abs()


def _group_rows(v: torch.Tensor, size: int) -> torch.Tensor:
    return v.view(-1, size).sum(1)


def _grad(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(w) if g is None else g


@torch.no_grad()
def layer_scores(layer: nn.Module, geo: LayerGeometry, p: Params) -> dict[str, torch.Tensor | None]:
    proj = arch.projections(layer)

    def s(role: str, dim: int) -> torch.Tensor:
        pr = proj[role]
        return _slice_scores(pr.weight, pr.grad, dim, p.variant)

    hd = geo.head_dim
    if p.variant == "element":
        q, o = _group_rows(s("q", 1), hd), _group_rows(s("o", 0), hd)
        k, v = _group_rows(s("k", 1), hd), _group_rows(s("v", 1), hd)
    else:
        # Vector-wise: one signed sum per whole slice (all of a head's rows), then |.|.
        def vs(role: str, dim: int) -> torch.Tensor:
            pr = proj[role]
            prod = (pr.weight.double() * pr.grad.double()).sum(dim)
            return prod.view(-1, hd).sum(1).abs()

        q, o, k, v = vs("q", 1), vs("o", 0), vs("k", 1), vs("v", 1)
    head = _agg(torch.stack([q, o], -1), p.aggregation)
    members = torch.cat([
        q.view(geo.n_kv, geo.group), o.view(geo.n_kv, geo.group), k[:, None], v[:, None],
    ], dim=1)
    kv = _agg(members, p.aggregation)
    ch = None
    if "down" in proj:
        ch = _agg(torch.stack([s("gate", 1), s("up", 1), s("down", 0)], -1), p.aggregation).float()
    # Layer: the Taylor estimate of zeroing all of the layer's linears (MoE: every expert's) at once.
    weights = [(proj[r].weight, proj[r].grad) for r in arch.ROLES if r in proj]
    weights += [(lin.weight, lin.weight.grad) for ex in arch.experts(layer) for _path, lin in ex.values()]
    prods = [w.double() * _grad(w, g).double() for w, g in weights]
    lay = sum(x.abs().sum() for x in prods) if p.variant == "element" else abs(sum(x.sum() for x in prods))
    return {"head": head.float(), "kv_group": kv.float(), "channel": ch, "layer": torch.as_tensor(lay).float()}


def score(model: nn.Module, calib: Calibration, params: Params, progress: bool = True) -> Scores:
    windows = pick_windows(calib.windows, params.n_windows)
    layers = decoder_layers(model)
    linears = [mod for layer in layers for mod in layer.modules() if isinstance(mod, nn.Linear)]
    # Only the decoder linears need gradients; embeddings and the tied LM head are never pruned.
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in linears:
        lin.weight.requires_grad_(True)
        lin.weight.grad = None
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for b in batches(windows, params.batch_size, "taylor", progress):
                out = model(input_ids=b, labels=b, use_cache=False)
                # Weighted so the accumulated gradient is that of the mean loss over all windows.
                (out.loss * (len(b) / len(windows))).backward()
        per_layer = [layer_scores(layer, arch.geometry(layer), params) for layer in layers]
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        model.train(was_training)
    return Scores(
        "taylor",
        layer=torch.stack([d["layer"] for d in per_layer]),
        head=[d["head"] for d in per_layer],
        kv_group=[d["kv_group"] for d in per_layer],
        # Channel scores for every layer or none (an MoE block has no dense MLP to score).
        channel=None if any(d["channel"] is None for d in per_layer) else [d["channel"] for d in per_layer],
        info={"windows": len(windows), "variant": params.variant, "aggregation": params.aggregation},
    )
