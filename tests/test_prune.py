"""Pruning on the tiny random Llama: plans, surgery, reload, KV cache, correction, stages."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqflow import architectures as arch
from pqflow.methods.importance import magnitude
from pqflow.methods.importance.common import Scores, geometries, non_embedding_params
from pqflow.methods.prune import depth, hybrid, width
from pqflow.methods.prune.correction import correct
from pqflow.methods.prune.surgery import apply_plan
from pqflow.models import load_model_artifact, save_model, weight_bytes

X = torch.arange(40).remainder(250).view(2, 20)


def _scores(model) -> Scores:
    return magnitude.score(model, None, magnitude.Params())


def _cut(model, method, ratio: float, **kw):
    geos = geometries(model)
    mod = {"width": width, "depth": depth, "hybrid": hybrid}[method]
    p = mod.Params(round_to=32, min_channels=32, **kw) if method != "depth" else mod.Params(**kw)
    plan = mod.plan(geos, _scores(model), int(ratio * non_embedding_params(model)), p)
    return plan, apply_plan(model, plan)


def test_gqa_consistent_head_removal(tiny):
    model, _ = tiny
    plan, _ = _cut(model, "width", 0.4, allocation="uniform", head_mode="query")
    for layer in arch.decoder_layers(model):
        g, pr = arch.geometry(layer), arch.projections(layer)
        assert g.n_heads % g.n_kv == 0 and pr["o"].in_features == pr["q"].out_features
    assert any(len(k.heads) < 4 for k in plan.keep.values())
    for k in plan.keep.values():  # every kept KV group keeps the same number of query heads
        counts = {kv: sum(1 for h in k.heads if h // 2 == kv) for kv in k.kv}
        assert len(set(counts.values())) == 1
    with torch.no_grad():
        sdpa = model(input_ids=X).logits
        # The eager kernel repeats each KV head for its query heads: the attention's head
        # bookkeeping must match the cut weights for it to agree with SDPA.
        model.set_attn_implementation("eager")
        assert torch.allclose(model(input_ids=X).logits, sdpa, atol=1e-5)


def test_group_mode_removes_whole_kv_groups(tiny):
    model, _ = tiny
    _cut(model, "width", 0.3, allocation="uniform", head_mode="group")
    kvs = [arch.projections(layer)["k"].out_features for layer in arch.decoder_layers(model)]
    assert min(kvs) == 32  # one KV head of 32 dims left where a group went
    model(input_ids=X)


@pytest.mark.parametrize("alloc", ["global", "uniform", "layer-score"])
def test_shapes_and_bytes_shrink_in_proportion(tiny, tmp_path: Path, alloc: str):
    model, tok = tiny
    save_model(model, tok, tmp_path / "full")
    full_bytes, full_params = weight_bytes(tmp_path / "full"), sum(p.numel() for p in model.parameters())
    base = non_embedding_params(model)
    _cut(model, "width", 0.3, allocation=alloc)
    removed = base - non_embedding_params(model)
    assert abs(removed / base - 0.3) < 0.06
    for layer in arch.decoder_layers(model):
        assert arch.geometry(layer).inter % 32 == 0
    save_model(model, tok, tmp_path / "cut", fmt="pqflow-pruned")
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(tmp_path / "cut") / full_bytes == pytest.approx(params / full_params, rel=0.01)


def _reload_logits(folder: Path) -> torch.Tensor:
    code = (
        "import sys, torch; from pqflow.models import load_model_artifact as L; "
        "m = L(sys.argv[1]).model; x = torch.arange(40).remainder(250).view(2, 20); "
        "torch.save(m(input_ids=x).logits.detach(), sys.argv[2])"
    )
    out = folder.parent / f"{folder.name}.pt"
    subprocess.run([sys.executable, "-c", code, str(folder), str(out)], check=True, capture_output=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("method", ["width", "depth"])
def test_reload_in_fresh_process_gives_identical_logits(tiny, tmp_path: Path, method: str):
    model, tok = tiny
    _, uniform = _cut(model, method, 0.3)
    fmt = "hf" if uniform else "pqflow-pruned"
    save_model(model, tok, tmp_path / "m", fmt=fmt)
    with torch.no_grad():
        ref = model(input_ids=X).logits
    assert torch.equal(_reload_logits(tmp_path / "m"), ref)
    if uniform:  # uniform layers: plain transformers reloads it too
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        with torch.no_grad():
            assert torch.equal(plain(input_ids=X).logits, ref)


def test_depth_prune_generate_with_cache_equals_without(tiny):
    model, _ = tiny
    plan, uniform = _cut(model, "depth", 0.5)
    assert uniform and len(plan.drop) == 2 and model.config.num_hidden_layers == 2
    # KV-cache slots renumbered (the attention module carries its block's index)
    assert [m.layer_idx for layer in arch.decoder_layers(model) for m in layer.modules()
            if hasattr(m, "layer_idx")] == [0, 1]
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 258}
    with_cache = model.generate(X[:1], use_cache=True, **kw)
    without = model.generate(X[:1], use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_nonuniform_width_generate_with_cache(tiny):
    model, _ = tiny
    _, uniform = _cut(model, "hybrid", 0.4, layer_share=0.5, head_mode="query")
    assert not uniform
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 258}
    assert torch.equal(model.generate(X[:1], use_cache=True, **kw), model.generate(X[:1], use_cache=False, **kw))


@pytest.mark.parametrize("how", ["reformation", "mask-tuning", "reformation+inputs"])
def test_correction_lowers_layer_output_error(tiny, how: str):
    model, _ = tiny
    original = copy.deepcopy(model)
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    plan, _ = _cut(model, "width", 0.3)
    with torch.no_grad():
        before = (model(input_ids=windows).logits - original(input_ids=windows).logits).pow(2).mean()
    p = width.Params(correction=how.split("+")[0], refit_inputs=how.endswith("inputs"), batch_size=4)
    report = correct(original, model, plan.kept_layers(4), set(plan.keep), windows, p, progress=False)
    assert report.fits and all(r["after"] <= r["before"] + 1e-9 for r in report.fits)
    assert sum(r["after"] for r in report.fits) < sum(r["before"] for r in report.fits)
    with torch.no_grad():
        after = (model(input_ids=windows).logits - original(input_ids=windows).logits).pow(2).mean()
    assert after < before


def test_local_reformation_is_the_closed_form(tiny):
    """target=layer, propagate=False: W_k = W X Xₖᵀ (Xₖ Xₖᵀ + λI)⁻¹ on the down projection of a cut layer."""
    model, _ = tiny
    original = copy.deepcopy(model)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    plan, _ = _cut(model, "width", 0.3, head_mode="none")
    i = sorted(plan.keep)[0]
    keep = torch.tensor(sorted(plan.keep[i].channels))
    got = {}
    down = arch.projections(arch.decoder_layers(original)[i])["down"].module
    h = down.register_forward_pre_hook(lambda _m, a: got.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        original(input_ids=windows)
    h.remove()
    x = got["x"][0].reshape(-1, down.in_features).double()  # tokens x inter
    w = down.weight.double()
    xk = x[:, keep]
    g = xk.T @ xk
    lam = 0.01 * g.diagonal().mean()
    expect = (w @ x.T @ xk + lam * w[:, keep]) @ torch.linalg.inv(g + lam * torch.eye(len(keep), dtype=g.dtype))
    p = width.Params(correction="reformation", correct_target="layer", propagate=False, correct_all=False,
                     batch_size=4)
    correct(original, model, plan.kept_layers(4), set(plan.keep), windows, p, progress=False)
    got_w = arch.projections(arch.decoder_layers(model)[i])["down"].weight.double()
    assert torch.allclose(got_w, expect, atol=1e-4, rtol=1e-3)


def test_stages_through_runner(tiny_recipe, tmp_path: Path):
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    data = tiny_recipe.model_dump(mode="json")
    data["stages"]["importance"] = {"enabled": True, "method": "taylor", "params": {"n_windows": 4}}
    data["stages"]["prune"] = {"enabled": True, "method": "width", "ratio": 0.25,
                               "params": {"round_to": 32, "correction": "reformation", "correct_windows": 4}}
    recipe = parse_recipe(data)
    run_stage("calibrate", recipe, {}, str(tmp_path / "cal"))
    imp = run_stage("importance", recipe, {"calib": str(tmp_path / "cal")}, str(tmp_path / "imp"))
    assert (tmp_path / "imp" / "scores.safetensors").is_file() and (tmp_path / "imp" / "importance.png").is_file()
    assert imp.summary["layers"] == 4
    pr = run_stage("prune", recipe, {"calib": str(tmp_path / "cal"), "importance": str(tmp_path / "imp")},
                   str(tmp_path / "pruned"))
    meta = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert abs(meta["ratio_removed"] - 0.25) < 0.05 and pr.summary["params_after"] < 700_000
    loaded = load_model_artifact(tmp_path / "pruned")
    loaded.model(input_ids=X)
    ev = run_stage("evaluate", recipe, {"model": str(tmp_path / "pruned")}, str(tmp_path / "eval"))
    assert ev.summary["ppl"] > 1


def test_width_needs_structure_scores(tiny):
    from pqflow.errors import PqflowError

    model, _ = tiny
    s = Scores("cosine-layer", layer=torch.ones(4))
    with pytest.raises(PqflowError, match="channel scores"):
        width.plan(geometries(model), s, 1000, width.Params())
