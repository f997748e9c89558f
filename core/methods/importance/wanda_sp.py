"""Structured Wanda (Wanda-sp / FLAP's baseline): |W| times the input activation norm.

A structure's score sums ``|W_ij| · ‖X_j‖`` over the columns it removes: the down projection's
column for an MLP channel, the attention output projection's columns for a head. ``with_rows`` adds
the rows it removes (gate/up for a channel, q/k/v for a head) scored against their own inputs.
Needs only the calibration artifact's activation norms, no forward pass.

An MoE block's layer score sums its experts' down columns (experts without calibration statistics,
reached by no token, count zero); its channels are not scored.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow import architectures as arch
from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, decoder_layers


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    with_rows: bool = Field(False, description="also score the rows removed with each structure")


def _cols(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return (w.abs().double() * norm.double().to(w.device)[None, :]).sum(0)


def _rows(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return (w.abs().double() * norm.double().to(w.device)[None, :]).sum(1)


def _linear_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _experts_total(layer: nn.Module, calib: Calibration, names: dict[int, str]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for ex in arch.experts(layer):
        down = ex["down"][1]
        try:
            norm = calib.act_norm(names[id(down)])
        except KeyError:  # no calibration token was routed to this expert
            continue
        total = total + _cols(down.weight, norm).sum().cpu()
    return total


@torch.no_grad()
def score(model: nn.Module, calib: Calibration, params: Params, progress: bool = True) -> Scores:
    names = _linear_names(model)
    heads, kvs, chans, mlp_totals = [], [], [], []
    for layer in decoder_layers(model):
        geo = arch.geometry(layer)
        p = arch.projections(layer)

        def norm(role: str, p: dict[str, arch.Proj] = p) -> torch.Tensor:
            return calib.act_norm(names[id(p[role].module)])

        o = _cols(p["o"].weight, norm("o")).view(geo.n_heads, geo.head_dim).sum(1)
        kv_own = torch.zeros(geo.n_kv, dtype=torch.float64, device=o.device)
        if params.with_rows:
            o = o + _rows(p["q"].weight, norm("q")).view(geo.n_heads, -1).sum(1)
            kv_own = (_rows(p["k"].weight, norm("k")) + _rows(p["v"].weight, norm("v")))
            kv_own = kv_own.view(geo.n_kv, -1).sum(1)
        heads.append(o.float())
        kvs.append((o.view(geo.n_kv, geo.group).sum(1) + kv_own).float())
        if "down" in p:
            ch = _cols(p["down"].weight, norm("down"))
            if params.with_rows:
                ch = ch + _rows(p["gate"].weight, norm("gate")) + _rows(p["up"].weight, norm("up"))
            chans.append(ch.float())
            mlp_totals.append(chans[-1].sum())
        else:
            mlp_totals.append(_experts_total(layer, calib, names).float().to(o.device))
    layer = torch.stack([h.sum() + c for h, c in zip(heads, mlp_totals, strict=True)])
    channel = chans if len(chans) == len(heads) else None
    return Scores("wanda-sp", layer=layer, head=heads, kv_group=kvs, channel=channel)
