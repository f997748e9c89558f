"""Importance and width pruning through the architecture adapter, on the tiny random model of every
supported family: scores, cuts as far as the family allows, reformation, save and reload."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pqflow import architectures as arch
from pqflow.architectures import CHANNEL_PRUNING, HEAD_PRUNING, LAYER_DROPPING, UnsupportedArchitecture
from pqflow.calibration import STATS_FILE, WINDOWS_FILE, Calibration, collect_stats
from pqflow.methods.importance import magnitude, taylor, wanda_sp
from pqflow.methods.importance.common import Scores, geometries, non_embedding_params
from pqflow.methods.prune import depth, hybrid, width
from pqflow.methods.prune.correction import correct
from pqflow.methods.prune.plan import LayerKeep, PrunePlan
from pqflow.methods.prune.surgery import apply_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.tiny import TINY_FAMILIES, tiny_family_config, tiny_model

FAMILIES = list(TINY_FAMILIES)
# Longer than the tiny Gemmas' sliding window (32), so sliding and global layers see different masks.
WINDOWS = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
X = WINDOWS[:2, :24]


def _model(family: str):
    model, tok = tiny_model(family)
    return arch.prepare(model), tok


def _calib(model, folder: Path) -> Calibration:
    stats, aliases = collect_stats(model, WINDOWS, batch_size=4, progress=False)
    save_file({"input_ids": WINDOWS}, folder / WINDOWS_FILE)
    save_file(stats, folder / STATS_FILE)
    meta = {"aliases": aliases}
    (folder / "calib.json").write_text(json.dumps(meta))
    return Calibration(folder, meta)


def _allowed(model) -> tuple[bool, bool]:
    return arch.refusal(model, HEAD_PRUNING) is None, arch.refusal(model, CHANNEL_PRUNING) is None


def _width_params(model, **kw) -> width.Params:
    """Heads and channels where the family allows (phi3, olmo2: channels only; qwen3_moe: heads only)."""
    heads, channels = _allowed(model)
    return width.Params(round_to=32, min_channels=64, head_mode="query" if heads else "none", channels=channels,
                        **kw)


def _reload(model, tok, uniform: bool, out: Path) -> torch.Tensor:
    fmt = "hf" if uniform else "pqflow-pruned"
    save_model(model, tok, out, fmt=fmt)
    assert json.loads((out / "pqflow_model.json").read_text())["format"] == fmt
    with torch.no_grad():
        return load_model_artifact(out).model(input_ids=X).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_scores_every_family(family: str, tmp_path: Path):
    model, _ = _model(family)
    calib = _calib(model, tmp_path)
    moe = arch.geometry(arch.decoder_layers(model)[0]).n_experts > 0
    for s in (taylor.score(model, calib, taylor.Params(n_windows=2, batch_size=2), progress=False),
              wanda_sp.score(model, calib, wanda_sp.Params(with_rows=True), progress=False)):
        assert s.layer.shape == (4,) and torch.isfinite(s.layer).all() and (s.layer > 0).all()
        assert [t.shape for t in s.head] == [(4,)] * 4 and [t.shape for t in s.kv_group] == [(2,)] * 4
        assert all(torch.isfinite(t).all() for t in s.head + s.kv_group)
        if moe:  # expert channels are not scored (no method prunes them)
            assert s.channel is None
        else:
            assert [t.shape for t in s.channel] == [(384,)] * 4 and all((t >= 0).all() for t in s.channel)
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_width_prune_with_reformation_reloads_identically(family: str, tmp_path: Path):
    model, tok = _model(family)
    heads, channels = _allowed(model)
    scores = taylor.score(model, _calib(model, tmp_path), taylor.Params(n_windows=2, batch_size=2), progress=False)
    p = _width_params(model, allocation="uniform", correction="reformation", batch_size=4)
    width.check(model, p)
    geos = geometries(model)
    base = non_embedding_params(model)
    plan = width.plan(geos, scores, int(0.2 * base), p)
    original = copy.deepcopy(model)
    uniform = apply_plan(model, plan)

    after = geometries(model)
    assert 0.05 < 1 - non_embedding_params(model) / base < 0.25
    assert any(a.n_heads < g.n_heads for a, g in zip(after, geos, strict=True)) == heads
    assert any(a.inter < g.inter for a, g in zip(after, geos, strict=True)) == channels
    for layer, g in zip(arch.decoder_layers(model), after, strict=True):
        pr = arch.projections(layer)
        assert pr["q"].out_features == g.n_heads * g.head_dim == pr["o"].in_features
        if "down" in pr:
            assert pr["gate"].out_features == pr["up"].out_features == pr["down"].in_features == g.inter

    def err() -> torch.Tensor:
        with torch.no_grad():
            return (model(input_ids=WINDOWS).logits - original(input_ids=WINDOWS).logits).pow(2).mean()

    before = err()
    report = correct(original, model, plan.kept_layers(len(geos)), set(plan.keep), WINDOWS, p, progress=False)
    assert report.fits and all(r["after"] <= r["before"] + 1e-9 for r in report.fits)
    assert err() < before
    with torch.no_grad():
        ref = model(input_ids=X).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(_reload(model, tok, uniform, tmp_path / "m"), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_widths_reload_identically(family: str, tmp_path: Path):
    """Global allocation: layers lose different amounts, saved as pqflow-pruned, reloaded exactly."""
    model, tok = _model(family)
    p = _width_params(model, allocation="global")
    _, channels = _allowed(model)
    # Heads only (MoE) have few units: a small budget cuts some layers and not others.
    ratio = 0.2 if channels else 0.03
    plan = width.plan(geometries(model), magnitude.score(model, None, magnitude.Params()),
                      int(ratio * non_embedding_params(model)), p)
    uniform = apply_plan(model, plan)
    shapes = [(g.n_heads, g.n_kv, g.inter) for g in geometries(model)]
    assert not uniform and len(set(shapes)) > 1
    with torch.no_grad():
        ref = model(input_ids=X).logits
    assert torch.equal(_reload(model, tok, uniform, tmp_path / "m"), ref)


def _alternating_gemma3():
    """Gemma 3 with sliding and global layers alternating (the tiny one's are all sliding): each
    layer type has its own mask and its own rotary embedding."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_family_config("gemma3")
    cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    return arch.prepare(model.eval())


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_reformation_rebuilds_each_block_with_its_own_arguments(family: str):
    """Sliding and global layers get different masks (and, Gemma 3, rotary embeddings): the block
    rebuilt from the adapter's pieces with the arguments captured for it gives the block's own
    output; block 0's arguments would not do for the other layer type."""
    from pqflow.methods.prune.correction import block_kwargs, rebuild_block

    model = _alternating_gemma3() if family == "gemma3" else _model(family)[0]
    assert len(set(model.config.layer_types)) == 2
    layers = arch.decoder_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda _m, a, o, i=i: seen.__setitem__(i, (a[0], o))) for i, layer in
             enumerate(layers)]
    with torch.no_grad():
        model(input_ids=WINDOWS[:1])
    for h in hooks:
        h.remove()
    kws = block_kwargs(model, WINDOWS)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            x, out = seen[i]
            assert (rebuild_block(layer, x, kws[i])[-1] - out).abs().max() < 1e-5
        assert (rebuild_block(layers[1], seen[1][0], kws[0])[-1] - seen[1][1]).abs().max() > 1e-3


def test_needs_names_the_capabilities_params_ask_for():
    assert width.needs(width.Params()) == {HEAD_PRUNING, CHANNEL_PRUNING}
    assert width.needs(width.Params(head_mode="none")) == {CHANNEL_PRUNING}
    assert width.needs(width.Params(channels=False)) == {HEAD_PRUNING}
    assert depth.needs(depth.Params()) == {LAYER_DROPPING}
    assert hybrid.needs(hybrid.Params()) == {LAYER_DROPPING, CHANNEL_PRUNING}
    assert hybrid.needs(hybrid.Params(layer_share=0, head_mode="group")) == {HEAD_PRUNING, CHANNEL_PRUNING}


@pytest.mark.parametrize(("family", "params", "cap", "hint"), [
    ("phi3", {}, HEAD_PRUNING, "head_mode: none"),
    ("olmo2", {"head_mode": "group"}, HEAD_PRUNING, "head_mode: none"),
    ("qwen3_moe", {}, CHANNEL_PRUNING, "channels: false"),
])
def test_refused_cut_names_family_and_method(family: str, params: dict, cap: str, hint: str):
    model, _ = _model(family)
    p = width.Params(**params)
    with pytest.raises(UnsupportedArchitecture) as e:
        width.check(model, p)
    msg = str(e.value)
    assert family in msg and "'width'" in msg and cap in msg and hint in msg
    # The same answer from the config alone (what `pqflow validate` has before any model loads).
    with pytest.raises(UnsupportedArchitecture, match=family):
        width.check({"model_type": model.config.model_type}, p)
    # A plan applied directly is refused before anything is cut.
    g = geometries(model)[0]
    if cap == HEAD_PRUNING:  # one query head less in each KV group
        keep = LayerKeep([0, 2], list(range(g.n_kv)), list(range(g.inter)))
    else:  # half the MLP channels
        keep = LayerKeep(list(range(g.n_heads)), list(range(g.n_kv)), list(range(g.inter // 2)))
    shapes = [(x.n_heads, x.n_kv, x.inter) for x in geometries(model)]
    with pytest.raises(UnsupportedArchitecture, match=cap):
        apply_plan(model, PrunePlan(keep={0: keep}))
    assert [(x.n_heads, x.n_kv, x.inter) for x in geometries(model)] == shapes


def test_width_without_heads_or_channels_is_refused():
    from pqflow.errors import PqflowError

    with pytest.raises(PqflowError, match="nothing to remove"):
        width.plan(geometries(_model("llama")[0]), Scores("x", layer=torch.ones(4)), 1000,
                   width.Params(head_mode="none", channels=False))
