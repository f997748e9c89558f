"""Importance methods on the tiny random Llama: shapes, GQA groups, and what the scores mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pqflow import architectures as arch
from pqflow.calibration import STATS_FILE, WINDOWS_FILE, Calibration, collect_stats
from pqflow.methods.importance import REGISTRY
from pqflow.methods.importance.common import Scores
from pqflow.methods.importance.condition import column_scores, damped_inverse


@pytest.fixture
def calib(tiny, tmp_path: Path) -> Calibration:
    model, _ = tiny
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    stats, aliases = collect_stats(model, windows, batch_size=4, progress=False)
    save_file({"input_ids": windows}, tmp_path / WINDOWS_FILE)
    save_file(stats, tmp_path / STATS_FILE)
    meta = {"aliases": aliases}
    (tmp_path / "calib.json").write_text(json.dumps(meta))
    return Calibration(tmp_path, meta)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_method_scores_every_granularity_it_claims(tiny, calib, name: str, tmp_path: Path):
    model, _ = tiny
    params = REGISTRY.params(name, {"n_windows": 4} if name in ("taylor", "cosine-layer", "condition") else {})
    s = REGISTRY.module(name).score(model, calib, params, progress=False)
    assert s.layer.shape == (4,) and torch.isfinite(s.layer).all()
    if name == "cosine-layer":
        assert s.granularities() == ["layer"]
    else:
        assert [t.shape for t in s.head] == [(4,)] * 4
        assert [t.shape for t in s.kv_group] == [(2,)] * 4
        assert [t.shape for t in s.channel] == [(384,)] * 4
        assert all((t >= 0).all() for t in s.channel)
    s.save(tmp_path)
    back = Scores.load(tmp_path)
    assert torch.equal(back.layer, s.layer) and back.granularities() == s.granularities()
    assert not any(p.grad is not None for p in model.parameters())


def test_taylor_matches_loss_gradient_definition(tiny, calib):
    """Element-wise score of channel c = Σ |w ∂L/∂w| over gate row, up row and down column."""
    model, _ = tiny
    mod = REGISTRY.module("taylor")
    s = mod.score(model, calib, mod.Params(n_windows=4, batch_size=4), progress=False)
    x = calib.windows[:4]
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    pr = arch.projections(arch.decoder_layers(model)[1])
    c = 7
    with torch.no_grad():
        want = sum(float((pr[r].weight * pr[r].grad).abs()[c].sum()) for r in ("gate", "up")) + float(
            (pr["down"].weight * pr["down"].grad).abs()[:, c].sum())
    assert s.channel[1][c].item() == pytest.approx(want, rel=1e-4)
    # A GQA group's score covers its KV head and all of its query heads (sum aggregation).
    assert (s.kv_group[1] >= s.head[1].view(2, 2).sum(1) - 1e-6).all()
    vec = mod.score(model, calib, mod.Params(n_windows=4, batch_size=4, variant="vector", aggregation="max"),
                    progress=False)
    assert (vec.channel[1] <= s.channel[1] + 1e-6).all()  # |Σ| <= Σ|.| slice by slice
    model.zero_grad()


def test_condition_score_is_refit_error():
    """s_j = output error left after removing neuron j and refitting the rest by least squares."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 0] + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)  # nearly collinear pair
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    gram = x.T @ x / len(x)
    s = column_scores(w, damped_inverse(gram, 1e-12))
    for j in range(6):
        rest = [k for k in range(6) if k != j]
        sol = torch.linalg.lstsq(x[:, rest], x @ w.T).solution
        err = ((x @ w.T - x[:, rest] @ sol) ** 2).sum() / len(x)
        assert s[j].item() == pytest.approx(err.item(), rel=1e-5)
    assert s[5] < s[1:5].min() and s[0] < s[1:5].min()  # the redundant pair is cheap to lose


def test_block_influence_is_one_minus_cosine(tiny, calib):
    model, _ = tiny
    mod = REGISTRY.module("cosine-layer")
    s = mod.score(model, calib, mod.Params(n_windows=2, batch_size=2), progress=False)
    x = calib.windows[:2]
    with torch.no_grad():
        hs = arch.backbone(model)(input_ids=x, output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input; the last one has the final norm applied, so check the rest
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert s.layer[i].item() == pytest.approx((1 - cos).mean().item(), rel=1e-4)
