"""Round-to-nearest on each group's min/max grid: the floor every other method is compared with."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.methods.quant.plan import Plan
from pqflow.quant.grid import mse_params
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import set_module

NEEDS_CALIBRATION = False


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_search: bool = Field(False, description="search a per-group range shrink minimising weight error (else plain min/max)")


@torch.no_grad()
def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params) -> nn.Module:
    del windows  # data-free
    for name, spec in plan.items():
        lin = model.get_submodule(name)
        scales = zeros = None
        if params.clip_search:
            scales, zeros = mse_params(lin.weight, spec.bits, spec.group_size, spec.symmetric)
        set_module(model, name, QuantLinear.from_linear(lin, spec.bits, spec.group_size, spec.symmetric,
                                                        scales=scales, zeros=zeros))
    return model
