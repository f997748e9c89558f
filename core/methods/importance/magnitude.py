"""Weight magnitude: the data-free baseline. A structure's score is the norm of all the weights
it removes (the q rows and o columns of a head, plus the k/v rows for a GQA group, gate/up rows and
the down column for an MLP channel). An MoE block's layer score counts its experts' weights; its
channels are not scored."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow import architectures as arch
from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, decoder_layers


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    norm: Literal["l1", "l2"] = Field("l2", description="l1: sum |w|; l2: sum w²")


def _mag(w: torch.Tensor, dim: int, norm: str) -> torch.Tensor:
    w = w.double()
    return (w.abs() if norm == "l1" else w * w).sum(dim)


def _experts_total(layer: nn.Module, norm: str) -> torch.Tensor:
    """All expert weights of an MoE block, as one magnitude."""
    return sum(_mag(lin.weight, 1, norm).sum() for ex in arch.experts(layer) for _path, lin in ex.values())


@torch.no_grad()
def score(model: nn.Module, calib: Calibration | None, params: Params, progress: bool = True) -> Scores:
    heads, kvs, chans, mlp_totals = [], [], [], []
    for layer in decoder_layers(model):
        geo = arch.geometry(layer)
        p = arch.projections(layer)
        n = params.norm
        hd = geo.head_dim
        head = (_mag(p["q"].weight, 1, n) + _mag(p["o"].weight, 0, n)).view(geo.n_heads, hd).sum(1)
        kv_own = (_mag(p["k"].weight, 1, n) + _mag(p["v"].weight, 1, n)).view(geo.n_kv, hd).sum(1)
        heads.append(head.float())
        kvs.append((head.view(geo.n_kv, geo.group).sum(1) + kv_own).float())
        if "down" in p:
            ch = (_mag(p["gate"].weight, 1, n) + _mag(p["up"].weight, 1, n) + _mag(p["down"].weight, 0, n)).float()
            chans.append(ch)
            mlp_totals.append(ch.sum())
        else:
            mlp_totals.append(_experts_total(layer, n).float())
    layer = torch.stack([k.sum() + c for k, c in zip(kvs, mlp_totals, strict=True)])
    channel = chans if len(chans) == len(heads) else None
    return Scores("magnitude", layer=layer, head=heads, kv_group=kvs, channel=channel)
