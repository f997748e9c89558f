"""``bnb-int8``: LLM.int8 through bitsandbytes (see :mod:`.bnb`)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.methods.quant.bnb import FORMAT, NEEDS_CALIBRATION, QUANTIZES_EMBEDDINGS, convert
from pqflow.methods.quant.plan import Plan

__all__ = ["FORMAT", "NEEDS_CALIBRATION", "QUANTIZES_EMBEDDINGS", "Params", "quantize"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(6.0, ge=0, description="outlier threshold: input columns above it run in fp16")


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params) -> nn.Module:
    return convert(model, plan, "int8", threshold=params.threshold)
