"""Bit search on the tiny model: byte accounting, budget repair, priors, nevergrad, the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pqflow import architectures as arch
from pqflow.methods.bitsearch import budget as B
from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.evaluator import Evaluator
from pqflow.methods.bitsearch.priors import discrete_mi
from pqflow.methods.bitsearch.space import Choice, SearchSpace, parse_choice
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import resolve_plan
from pqflow.perplexity import window_nlls
from pqflow.quant.model import save_quantized
from pqflow.quant.report import folder_tensor_sizes, module_bytes
from pqflow.runner import run_stage

CHOICES = ["2g64", "3g32", "3g64", "4g128", "8g64", "16"]


def _space(model, granularity="linear", choices=CHOICES) -> SearchSpace:
    return SearchSpace.build(model, granularity, [parse_choice(c) for c in choices])


def _windows(n=4, seqlen=48, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_parse_choice():
    assert parse_choice("4g64") == Choice(4, 64) and parse_choice("3pc") == Choice(3, None)
    assert parse_choice("16") == Choice(16) and parse_choice("8g128").label == "8g128"
    for bad in ("5g64", "4", "16g64", "x"):
        with pytest.raises(Exception, match="bit choice"):
            parse_choice(bad)


def test_choices_sorted_by_bytes(tiny):
    sp = _space(tiny[0])
    per_choice = sp.cost.sum(0)
    assert list(per_choice) == sorted(per_choice)
    assert sp.choices[-1] == Choice(16)


@pytest.mark.parametrize("granularity", ["linear", "layer"])
def test_bytes_equal_what_quantize_stores(tiny, tmp_path: Path, granularity):
    model, tok = tiny
    sp = _space(model, granularity)
    rng = np.random.default_rng(0)
    alloc = tuple(int(x) for x in rng.integers(0, len(sp.choices), sp.n_units))
    doc = sp.allocation_json(alloc)
    plan = resolve_plan(model, 4, 64, False, doc)
    rtn.quantize(model, None, plan, rtn.Params())
    save_quantized(model, tok, tmp_path)
    stored = module_bytes(folder_tensor_sizes(tmp_path), sp.modules)
    assert stored == sp.bytes_of(alloc)


def test_repair_and_fill_respect_the_budget(tiny):
    sp = _space(tiny[0])
    rng = np.random.default_rng(1)
    low, high = int(sp.cost[:, 0].sum()), int(sp.cost[:, -1].sum())
    for _ in range(30):
        damage = np.sort(rng.random(sp.cost.shape), axis=1)[:, ::-1].copy()  # more bytes, less damage
        budget = int(rng.integers(low, high))
        alloc = tuple(int(x) for x in rng.integers(0, len(sp.choices), sp.n_units))
        fixed = B.fit(sp, alloc, budget, damage)
        assert sp.bytes_of(fixed) <= budget
        # filled: no single upgrade with a gain still fits
        rows = np.arange(sp.n_units)
        extra = sp.cost - sp.cost[rows, np.asarray(fixed)][:, None]
        gain = damage[rows, np.asarray(fixed)][:, None] - damage
        assert not ((extra > 0) & (gain > 1e-12) & (sp.bytes_of(fixed) + extra <= budget)).any()
        assert sp.bytes_of(B.repair(sp, alloc, budget, damage)) <= budget
    with pytest.raises(ValueError):
        B.repair(sp, (0,) * sp.n_units, low - 1, np.zeros(sp.cost.shape))


def test_budget_below_smallest_allocation_is_an_error(tiny):
    sp = _space(tiny[0])
    with pytest.raises(Exception, match="below the smallest"):
        sp.budget(1.5, None)


def test_evaluator_matches_the_quantized_model(tiny):
    model, _ = tiny
    w = _windows()
    sp = _space(model)
    ev = Evaluator(model, sp, w, "kl")
    assert ev.fp_nll == pytest.approx(float(window_nlls(model, w, progress=False).mean()), rel=1e-5)
    alloc = tuple(int(x) for x in np.random.default_rng(2).integers(0, len(sp.choices), sp.n_units))
    m = ev.measure(alloc)
    again = ev.measure(alloc)  # served from the cached trajectory: no block re-runs
    assert again.start_layer == len(ev.blocks) and again.nll == pytest.approx(m.nll, rel=1e-6)
    ev.restore()
    from pqflow.tiny import tiny_llama

    ref, _ = tiny_llama(seed=0)
    rtn.quantize(ref, None, resolve_plan(ref, 4, 64, False, sp.allocation_json(alloc)), rtn.Params())
    from pqflow.quant.model import round_floats

    nll = float(window_nlls(ref, w, progress=False).mean())
    assert m.nll == pytest.approx(nll, rel=2e-3)  # the saved model also rounds norms/embeddings to fp16
    round_floats(ref)
    assert m.kl > 0


def test_discrete_mi():
    a = torch.arange(1000) % 8
    assert discrete_mi(a, a) == pytest.approx(np.log(8), abs=0.05)
    b = torch.randint(0, 8, (1000,), generator=torch.Generator().manual_seed(0))
    assert abs(discrete_mi(a, b)) < 0.05


def _ctx(model, **kw) -> SearchContext:
    sp = _space(model, "linear", ["2g64", "3g64", "4g128", "8g64"])
    budget = sp.budget(3.6, None)
    return SearchContext(model, sp, budget, _windows(4, 48, 3), progress=False, **kw)


@pytest.mark.parametrize("prior", ["error", "mi", "sensitivity"])
def test_priors_fill_to_the_budget(tiny, prior):
    from pqflow.methods.bitsearch import importance_prior

    ctx = _ctx(tiny[0])
    if prior == "mi":
        ctx.calib = type("C", (), {"windows": _windows(8, 64, 5), "act_norm": lambda self, m: (_ for _ in ()).throw(KeyError(m))})()
    t = importance_prior.search(ctx, importance_prior.Params(prior=prior))
    assert t.bytes <= ctx.budget and t.bytes >= 0.9 * ctx.budget
    weights = np.asarray(ctx.layer_weights(prior), dtype=float)
    # usable layer weights (MI from the windows alone: the stand-in has no activation norms)
    assert len(weights) == 4 and np.isfinite(weights).all() and (weights >= 0).all()


def test_nevergrad_improves_on_its_seed_and_is_reproducible(tiny):
    from pqflow.methods.bitsearch import nevergrad_search as ngs

    params = ngs.Params(trials=10, prior="error")
    runs = []
    for _ in range(2):
        ctx = _ctx(tiny[0], seed=7)
        best = ngs.search(ctx, params)
        seed_trial = ctx.trials.records[0]
        assert seed_trial.source == "prior:error"
        assert best.objective <= seed_trial.objective
        assert all(t.bytes <= ctx.budget for t in ctx.trials.records)
        assert len(ctx.trials) == 10
        runs.append((best.alloc, [t.alloc for t in ctx.trials.records]))
        ctx.evaluator.restore()
    assert runs[0] == runs[1]


def test_nevergrad_prior_tunes_the_prior_knobs_reproducibly(tiny):
    from pqflow.methods.bitsearch import nevergrad_prior as ngp

    params = ngp.Params(trials=8, prior="error", optimizer="TwoPointsDE")
    runs = []
    for _ in range(2):
        ctx = _ctx(tiny[0], seed=3)
        best = ngp.search(ctx, params)
        first = ctx.trials.records[0]
        assert first.source == "prior:error" and best.objective <= first.objective
        assert {t.source for t in ctx.trials.records[1:]} == {"nevergrad-prior"}
        # every candidate is a greedy fill of the budget: nothing over it, little of it left
        assert all(0.9 * ctx.budget <= t.bytes <= ctx.budget for t in ctx.trials.records)
        assert 1 < len(ctx.trials) <= 8 and set(ctx.info["best_knobs"]) >= {"alpha", "eta", "gamma"}
        runs.append([t.alloc for t in ctx.trials.records])
        ctx.evaluator.restore()
    assert runs[0] == runs[1]


def test_nevergrad_prior_knobs_at_the_prior_give_the_prior(tiny):
    from pqflow.methods.bitsearch import nevergrad_prior as ngp

    ctx = _ctx(tiny[0])
    knobs = ngp.Knobs(ctx.space, ctx.err_unit, ctx.layer_weights("error"))
    assert np.allclose(knobs.damage(knobs.prior_vector), ctx.damage("error"))
    assert B.greedy(ctx.space, ctx.budget, knobs.damage(knobs.prior_vector)) == ctx.prior_allocation("error")
    # a large weight on one kind of linear gives that kind more bytes
    down_leaf = arch.projections(arch.decoder_layers(tiny[0])[0])["down"].name.rsplit(".", 1)[-1]
    kind = knobs.kind_names.index(down_leaf)
    x = knobs.prior_vector.copy()
    x[3 + kind] = 3.0
    alloc = B.greedy(ctx.space, ctx.budget, knobs.damage(x))
    down = [i for i, m in enumerate(ctx.space.units) if m.endswith(f".{down_leaf}")]
    cost = ctx.space.cost[np.arange(ctx.space.n_units)]
    assert sum(cost[i, alloc[i]] for i in down) >= sum(cost[i, ctx.prior_allocation("error")[i]] for i in down)
    # knob ranges that leave the prior out, or an unknown optimizer, are recipe errors
    from pqflow.errors import RecipeError

    for bad in ({"eta_range": (1.2, 1.5)}, {"optimizer": "NoSuchOptimizer"}):
        with pytest.raises(RecipeError, match="nevergrad-prior"):
            ngp.search(_ctx(tiny[0]), ngp.Params(trials=3, prior="error", **bad))


def test_nevergrad_prior_measures_candidates_in_worker_processes(tiny_recipe, tmp_path: Path):
    r = tiny_recipe
    r.stages.bit_search.enabled = True
    r.stages.bit_search.method = "nevergrad-prior"
    r.stages.bit_search.avg_bits = 4.0
    r.stages.bit_search.choices = ["2g64", "3g64", "4g64", "8g64"]
    r.stages.bit_search.heldout_windows = 2
    r.stages.bit_search.heldout_seqlen = 32
    r.stages.bit_search.params = {"trials": 8, "prior": "error", "workers": 2, "optimizer": "TwoPointsDE"}
    cal = run_stage("calibrate", r, {}, f"file://{tmp_path}/cal")
    res = run_stage("bit-search", r, {"calib": cal.uri}, f"file://{tmp_path}/bits")
    trials = json.loads((tmp_path / "bits" / "trials.json").read_text())["trials"]
    assert trials[0]["source"] == "prior:error" and {t["source"] for t in trials[1:]} == {"nevergrad-prior"}
    assert 1 < len(trials) <= 8 and all(t["bytes"] <= res.summary["budget_bytes"] for t in trials)
    assert res.summary["objective"] == min(t["objective"] for t in trials)


@pytest.mark.parametrize("method", ["nevergrad", "nevergrad-prior", "importance-prior", "uniform"])
def test_stage_through_the_runner(tiny_recipe, tmp_path: Path, method):
    r = tiny_recipe
    r.stages.bit_search.enabled = True
    r.stages.bit_search.method = method
    r.stages.bit_search.avg_bits = 4.0
    r.stages.bit_search.choices = ["2g64", "3g64", "4g64", "8g64"]
    r.stages.bit_search.heldout_windows = 4
    r.stages.bit_search.heldout_seqlen = 64
    r.stages.bit_search.params = {"trials": 6, "prior": "mi"} if method.startswith("nevergrad") else {}
    cal = run_stage("calibrate", r, {}, f"file://{tmp_path}/cal")
    res = run_stage("bit-search", r, {"calib": cal.uri}, f"file://{tmp_path}/bits")
    out = tmp_path / "bits"
    for f in ("allocation.json", "trials.json", "pareto.json", "pareto.png", "bits_heatmap.png", "search.json"):
        assert (out / f).is_file(), f
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["bytes"] <= res.summary["budget_bytes"] and len(alloc["modules"]) == 28
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert all(t["bytes"] <= res.summary["budget_bytes"] for t in trials)
    # the allocation feeds quantize, and the stored bytes are the searched bytes
    r.stages.quantize.enabled = True
    q = run_stage("quantize", r, {"allocation": res.uri}, f"file://{tmp_path}/q")
    assert q.summary["quantized_bytes"] == alloc["bytes"]
    assert run_stage("bit-search", r, {"calib": cal.uri}, f"file://{tmp_path}/bits").skipped


def test_trials_use_the_initialiser_fake_quantizer_of_mrem_and_e2e(capsys):
    from pqflow.methods.bitsearch.fakequant import weight_fn_for
    from pqflow.methods.quant import e2e, mrem

    assert weight_fn_for("e2e", e2e.Params(init="rtn", rtn={"clip_search": True}), None)[1] == "rtn-clip"
    assert weight_fn_for("mrem", mrem.Params(init="rtn"), None)[1] == "rtn"
    # GPTQ initialisers need XᵀX; without it the stage says so and scores with RTN
    assert weight_fn_for("e2e", e2e.Params(init="mrem"), None)[1] == "rtn"
    assert "no XᵀX" in capsys.readouterr().err
