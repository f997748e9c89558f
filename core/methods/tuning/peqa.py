"""``peqa``: train only the quantization scales of the packed layers (PEQA, Kim et al. 2023).

``W = s * (Q - z)`` with the integer codes ``Q`` and zero points ``z`` frozen; the gradient reaches
``s`` through :meth:`QuantLinear.dequantize`. Scales are trained in float32 (an fp16 scale cannot
take steps of ~1e-5 relative) and rounded back to their stored dtype at the end, so the result is
a ``pqflow-quant`` model with the same codes and the same bytes as its input.

While training, each packed linear (and a head tied to a packed embedding) computes through
:class:`ScaledLinear`: ``Q - z`` is unpacked once into a float copy kept for the whole run, and
the backward pass rebuilds ``W`` from it instead of keeping every layer's ``W`` and ``Q - z``
alive between forward and backward. The values are the ones :meth:`QuantLinear.dequantize`
computes, with the same operations; the gain is time (no unpacking per step) and memory.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pqflow import formats
from pqflow.formats import bitsandbytes, packed
from pqflow.methods.tuning.common import Base, Tuned
from pqflow.methods.tuning.train import TrainData, TrainParams, resolve_device, train
from pqflow.quant import QuantEmbedding
from pqflow.quant.linear import QuantLinear, TiedQuantHead
from pqflow.quant.model import quantized_modules


class Params(TrainParams):
    lr: float = Field(5e-5, gt=0, description="peak learning rate of the scales")
    include_embeddings: bool = Field(True, description="also tune the scales of a packed embedding / tied head")


class ScaledLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with ``W = (Q - z) * s`` per group, differentiable in ``x`` and ``s``.

    ``cq`` is ``Q - z`` as ``[out, groups, group_size]``. Only ``x`` is kept for the backward pass
    (autograd keeps it for the weight gradient anyway); ``W`` is rebuilt there. The products are
    those autograd computes for ``F.linear`` of the dequantized weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cq: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = (cq.to(x.dtype) * s.to(x.dtype)[..., None]).view(cq.shape[0], -1)
        ctx.save_for_backward(x, cq, s)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        x, cq, s = ctx.saved_tensors
        cqd = cq.to(x.dtype)
        w = (cqd * s.to(x.dtype)[..., None]).view(cq.shape[0], -1)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = g2.mm(w).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[2]:
            grad_w = g2.t().mm(x.reshape(-1, x.shape[-1]))  # as MmBackward for a row-major weight
            grad_s = (grad_w.reshape(cq.shape) * cqd).sum(-1).to(s.dtype)
        return grad_x, None, grad_s, None


def _grouped_codes(m: QuantLinear) -> torch.Tensor | None:
    """``Q - z`` of ``m`` as ``[out, groups, group_size]`` float32, or None when
    :meth:`QuantLinear.dequantize` gathers per column instead (one scale per row, or groups that
    do not tile the input): such a layer keeps its own path, whose scale gradient sums in another
    order."""
    g = m.group_size
    if g is None or m.in_features % g or m.scales.shape[1] * g != m.in_features:
        return None
    with torch.no_grad():
        codes = m.codes().to(torch.float32).view(m.out_features, -1, g)
        return codes - m.zero_points(torch.float32)[..., None]


def _linear_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return ScaledLinear.apply(x, self._peqa_cq, self.scales, self.bias)


def _head_forward(self: TiedQuantHead, x: torch.Tensor) -> torch.Tensor:
    emb = self.embedding[0]
    return ScaledLinear.apply(x, emb._peqa_cq, emb.scales, None)


def _install(model: nn.Module, qmods: dict[str, QuantLinear]) -> list[nn.Module]:
    """Route the trained modules' matmuls through :class:`ScaledLinear`; returns the patched ones."""
    patched: list[nn.Module] = []
    for m in qmods.values():
        cq = _grouped_codes(m)
        if cq is None:
            continue
        m._peqa_cq = cq
        if not isinstance(m, QuantEmbedding):  # a lookup dequantizes only its rows: kept as is
            m.forward = types.MethodType(_linear_forward, m)
            patched.append(m)
    for mod in model.modules():
        if isinstance(mod, TiedQuantHead) and hasattr(mod.embedding[0], "_peqa_cq"):
            mod.forward = types.MethodType(_head_forward, mod)
            patched.append(mod)
    return patched


def _uninstall(patched: list[nn.Module], qmods: dict[str, QuantLinear]) -> None:
    for mod in patched:
        del mod.forward
    for m in qmods.values():
        if hasattr(m, "_peqa_cq"):
            del m._peqa_cq


def tune(base: Base, data: TrainData, p: Params, out: Path) -> Tuned:
    model, tok = base.model, base.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    # A backend field marks a bitsandbytes model saved before pqflow-bnb had its own name.
    if base.fmt == bitsandbytes.NAME or base.meta.get("backend") == "bitsandbytes":
        raise ValueError("peqa tunes pqflow's packed scales; bitsandbytes layers have none to train (use lora)")
    qmods = {n: m for n, m in quantized_modules(model).items()
             if p.include_embeddings or not isinstance(m, QuantEmbedding)}
    if not qmods:
        raise ValueError("peqa needs a pqflow-quant model (packed QuantLinear layers); run the quantize stage first")
    codes_before = {n: m.qweight.clone() for n, m in qmods.items()}
    zeros_before = {n: m.zeros.clone() for n, m in qmods.items()}
    scales_before = {n: m.scales.detach().float().clone() for n, m in qmods.items()}
    for t in model.parameters():
        t.requires_grad_(False)
    stored = {}
    trainable = {}
    for n, m in qmods.items():
        stored[n] = m.scales.dtype
        m.scales.data = m.scales.data.float()
        m.scales.requires_grad_(True)
        m.cache = False
        trainable[f"{n}.scales"] = m.scales
    n_train = sum(t.numel() for t in trainable.values())
    model.to(resolve_device(p.device))
    patched = _install(model, qmods)
    torch.manual_seed(p.seed)
    try:
        hist = train(model, trainable, data, p, desc="peqa")
    finally:
        _uninstall(patched, qmods)
    model.to("cpu")
    drift = []
    with torch.no_grad():
        for n, m in qmods.items():
            m.scales.requires_grad_(False)
            m.scales.data = m.scales.data.to(stored[n])
            if not torch.equal(m.qweight, codes_before[n]) or not torch.equal(m.zeros, zeros_before[n]):
                raise RuntimeError(f"peqa changed the codes or zero points of {n}")
            old = scales_before[n]
            drift.append(float(((m.scales.float() - old).abs() / old.abs().clamp_min(1e-12)).mean()))
    meta = {k: v for k, v in base.meta.items() if k != "format"}
    formats.save_model(model, tok, out, packed.NAME, **{**meta, "tuned": "peqa"})
    print(f"[pqflow] peqa: {n_train:,} trainable scales in {len(qmods)} packed modules", file=sys.stderr)
    info = {"tuned_modules": len(qmods), "scale_rel_change": sum(drift) / len(drift)}
    return Tuned(model.eval(), hist, n_train, info)
