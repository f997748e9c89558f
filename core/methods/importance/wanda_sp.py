"""Structured Wanda (Wanda-sp / FLAP's baseline): |W| times the input activation norm.

A structure's score sums ``|W_ij| · ‖X_j‖`` over the columns it removes: down_proj's column for an
MLP channel, o_proj's columns for a head. ``with_rows`` adds the rows it removes (gate/up for a
channel, q/k/v for a head) scored against their own inputs. Needs only the calibration artifact's
activation norms, no forward pass.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, decoder_layers, layer_geometry


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    with_rows: bool = Field(False, description="also score the rows removed with each structure")


def _cols(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return (w.abs().double() * norm.double()[None, :]).sum(0)


def _rows(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return (w.abs().double() * norm.double()[None, :]).sum(1)


def _linear_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def score(model: nn.Module, calib: Calibration, params: Params, progress: bool = True) -> Scores:
    names = _linear_names(model)
    heads, kvs, chans = [], [], []
    for layer in decoder_layers(model):
        geo = layer_geometry(layer)
        a, m = layer.self_attn, layer.mlp

        def norm(lin: nn.Linear) -> torch.Tensor:
            return calib.act_norm(names[id(lin)])

        ch = _cols(m.down_proj.weight, norm(m.down_proj))
        o = _cols(a.o_proj.weight, norm(a.o_proj)).view(geo.n_heads, geo.head_dim).sum(1)
        kv_own = torch.zeros(geo.n_kv, dtype=torch.float64)
        if params.with_rows:
            ch = ch + _rows(m.gate_proj.weight, norm(m.gate_proj)) + _rows(m.up_proj.weight, norm(m.up_proj))
            o = o + _rows(a.q_proj.weight, norm(a.q_proj)).view(geo.n_heads, -1).sum(1)
            kv_own = (_rows(a.k_proj.weight, norm(a.k_proj)) + _rows(a.v_proj.weight, norm(a.v_proj)))
            kv_own = kv_own.view(geo.n_kv, -1).sum(1)
        heads.append(o.float())
        kvs.append((o.view(geo.n_kv, geo.group).sum(1) + kv_own).float())
        chans.append(ch.float())
    layer = torch.stack([h.sum() + c.sum() for h, c in zip(heads, chans, strict=True)])
    return Scores("wanda-sp", layer=layer, head=heads, kv_group=kvs, channel=chans)
