"""Weight magnitude: the data-free baseline. A structure's score is the norm of all the weights
it removes (q/o slices for a head, plus k/v for a GQA group, gate/up rows and the down column for
an MLP channel)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, decoder_layers, layer_geometry


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    norm: Literal["l1", "l2"] = Field("l2", description="l1: sum |w|; l2: sum w²")


def _mag(w: torch.Tensor, dim: int, norm: str) -> torch.Tensor:
    w = w.double()
    return (w.abs() if norm == "l1" else w * w).sum(dim)


@torch.no_grad()
def score(model: nn.Module, calib: Calibration | None, params: Params, progress: bool = True) -> Scores:
    heads, kvs, chans = [], [], []
    for layer in decoder_layers(model):
        geo = layer_geometry(layer)
        a, m = layer.self_attn, layer.mlp
        n = params.norm
        hd = geo.head_dim
        head = (_mag(a.q_proj.weight, 1, n) + _mag(a.o_proj.weight, 0, n)).view(geo.n_heads, hd).sum(1)
        kv_own = (_mag(a.k_proj.weight, 1, n) + _mag(a.v_proj.weight, 1, n)).view(geo.n_kv, hd).sum(1)
        heads.append(head.float())
        kvs.append((head.view(geo.n_kv, geo.group).sum(1) + kv_own).float())
        chans.append((_mag(m.gate_proj.weight, 1, n) + _mag(m.up_proj.weight, 1, n) + _mag(m.down_proj.weight, 0, n)).float())
    layer = torch.stack([k.sum() + c.sum() for k, c in zip(kvs, chans, strict=True)])
    return Scores("magnitude", layer=layer, head=heads, kv_group=kvs, channel=chans)
