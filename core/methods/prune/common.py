"""Parameters every prune method shares (the post-pruning correction and its calibration data),
and the check that a model's family allows what a method's parameters ask for."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pqflow.architectures import CHANNEL_PRUNING, HEAD_PRUNING, UnsupportedArchitecture, refusal
from pqflow.recipe import MAX_BATCH, MAX_LAYERS, MAX_WINDOWS

# What a recipe can change to avoid a refused capability.
_WAY_OUT = {HEAD_PRUNING: "set head_mode: none", CHANNEL_PRUNING: "set channels: false"}


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    correction: Literal["none", "reformation", "mask-tuning"] = Field(
        "none", description="post-pruning correction of kept weights from calibration data (no training)")
    correct_windows: int | None = Field(64, ge=1, le=MAX_WINDOWS, description="calibration windows the correction uses; null = all")
    correct_target: Literal["residual", "layer"] = Field(
        "residual", description="residual: match the original hidden states (also absorbs upstream error); "
                                "layer: match each module's own original output (Search-LLM)")
    propagate: bool = Field(True, description="feed each layer the pruned model's activations (sequential), "
                                              "not the original model's")
    correct_all: bool = Field(True, description="also correct layers that were not cut (they see shifted inputs)")
    refit_inputs: bool = Field(False, description="reformation: also refit q/k/v and gate/up so they map the pruned "
                                                   "model's inputs onto the original outputs")
    damping: float = Field(0.01, gt=0, le=1e6, description="ridge towards the original weights, fraction of mean diag of XᵀX")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="windows per forward pass during correction")
    protect_first: int = Field(0, ge=0, le=MAX_LAYERS, description="first decoder layers never cut")
    protect_last: int = Field(0, ge=0, le=MAX_LAYERS, description="last decoder layers never cut")


def prunable_layers(n_layers: int, p: CommonParams) -> list[int]:
    return [i for i in range(n_layers) if p.protect_first <= i < n_layers - p.protect_last]


def require_all(model_or_config: Any, method: str, caps: Iterable[str]) -> None:
    """Refuse, naming the family and the prune method, when the family of ``model_or_config`` (a
    model, a config or a config dict) refuses one of ``caps`` (a method module's ``needs``)."""
    for cap in sorted(caps):
        why = refusal(model_or_config, cap)
        if why:
            hint = f" ({_WAY_OUT[cap]})" if cap in _WAY_OUT else ""
            raise UnsupportedArchitecture(f"prune method '{method}': {why}{hint}")
