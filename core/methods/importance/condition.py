"""COMP's conditioning-based importance of MLP neurons (and attention heads), with block
influence for layers, from one pass over the calibration windows.

Let ``G = XᵀX / n`` be the Gram matrix of the activations a width cut removes columns from (the
inputs of the MLP's down projection for MLP channels, of the attention's output projection for
heads). How much neuron ``j`` matters depends on
how well-conditioned ``G`` stays without it: ``1 / (G⁻¹)_jj`` is the variance of neuron ``j``'s
activation left after projecting it on all the other neurons, i.e. the Schur complement of ``G``
at ``j``. A neuron that is nearly a combination of others (the direction that makes ``G``
ill-conditioned) scores near zero: the rest can take over its job. The score is the output error
left after that best re-fit of the remaining neurons,

    s_j = ‖W[:, j]‖² / (G⁻¹)_jj ,

and for a head (a block ``B`` of columns) ``tr(W_B ((G⁻¹)_BB)⁻¹ W_Bᵀ)``. ``damping`` regularises
``G`` (a fraction of its mean diagonal), which bounds its condition number.

MoE blocks get layer and head scores; their channels (inside experts) are not scored.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow import architectures as arch
from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, block_influence, decoder_layers, pick_windows
from pqflow.recipe import MAX_BATCH, MAX_WINDOWS


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_windows: int | None = Field(32, ge=1, le=MAX_WINDOWS, description="calibration windows; null = all")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    damping: float = Field(1e-3, gt=0, le=1e6, description="ridge added to the Gram matrix, fraction of its mean diagonal")


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    g = gram.double()
    g = g + damping * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype, device=g.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(g))


def column_scores(w: torch.Tensor, ginv: torch.Tensor) -> torch.Tensor:
    return (w.double() ** 2).sum(0) / ginv.diagonal()


def block_scores(w: torch.Tensor, ginv: torch.Tensor, blocks: list[list[int]]) -> torch.Tensor:
    w = w.double()
    out = []
    for cols in blocks:
        idx = torch.tensor(cols, device=w.device)
        wb = w[:, idx]
        sub = ginv[idx][:, idx]
        out.append(torch.trace(wb @ torch.linalg.solve(sub, wb.T)))
    return torch.stack(out)


def condition_number(gram: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(gram.double())
    return float(ev[-1] / ev[0].clamp_min(1e-30))


@torch.no_grad()
def score(model: nn.Module, calib: Calibration, params: Params, progress: bool = True) -> Scores:
    windows = pick_windows(calib.windows, params.n_windows)
    bi, grams = block_influence(model, windows, params.batch_size, grams=True, progress=progress)
    heads, kvs, chans, conds = [], [], [], []
    for i, layer in enumerate(decoder_layers(model)):
        geo = arch.geometry(layer)
        proj = arch.projections(layer)
        g_mlp = grams[i].get("down")
        if g_mlp is not None:
            chans.append(column_scores(proj["down"].weight.data, damped_inverse(g_mlp, params.damping)).float())
            conds.append(condition_number(g_mlp))
        ginv_o = damped_inverse(grams[i]["o"], params.damping)
        hd = geo.head_dim
        head_blocks = [list(range(h * hd, (h + 1) * hd)) for h in range(geo.n_heads)]
        group_blocks = [sum((head_blocks[h] for h in geo.head_of(k)), []) for k in range(geo.n_kv)]
        wo = proj["o"].weight.data
        heads.append(block_scores(wo, ginv_o, head_blocks).float())
        kvs.append(block_scores(wo, ginv_o, group_blocks).float())
    # Channel scores for every layer or none (an MoE block has no dense MLP to score).
    channel = chans if len(chans) == len(heads) else None
    return Scores("condition", layer=bi, head=heads, kv_group=kvs, channel=channel,
                  info={"windows": len(windows), "mlp_condition_number": conds})
