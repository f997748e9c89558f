"""``peqa``: train only the quantization scales of the packed layers (PEQA, Kim et al. 2023).

``W = s * (Q - z)`` with the integer codes ``Q`` and zero points ``z`` frozen; the gradient reaches
``s`` through :meth:`QuantLinear.dequantize`. Scales are trained in float32 (an fp16 scale cannot
take steps of ~1e-5 relative) and rounded back to their stored dtype at the end, so the result is
a ``pqflow-quant`` model with the same codes and the same bytes as its input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import Field

from pqflow import formats
from pqflow.formats import bitsandbytes, packed
from pqflow.methods.tuning.common import Base, Tuned
from pqflow.methods.tuning.train import TrainData, TrainParams, resolve_device, train
from pqflow.quant import QuantEmbedding
from pqflow.quant.model import quantized_modules


class Params(TrainParams):
    lr: float = Field(5e-5, gt=0, description="peak learning rate of the scales")
    include_embeddings: bool = Field(True, description="also tune the scales of a packed embedding / tied head")


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
    torch.manual_seed(p.seed)
    hist = train(model, trainable, data, p, desc="peqa")
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
