"""``bnb-nf4``: QLoRA's 4-bit NormalFloat through bitsandbytes (see :mod:`.bnb`)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.methods.quant.bnb import FORMAT, NEEDS_CALIBRATION, QUANTIZES_EMBEDDINGS, convert
from pqflow.methods.quant.plan import Plan

__all__ = ["FORMAT", "NEEDS_CALIBRATION", "QUANTIZES_EMBEDDINGS", "Params", "quantize"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    double_quant: bool = Field(True, description="quantize the per-block absmax constants too (QLoRA)")


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params) -> nn.Module:
    return convert(model, plan, "nf4", double_quant=params.double_quant)
