"""Calibration, quantization, the packed format, bit search and fine-tuning on every supported
family (pqflow.tiny.TINY_FAMILIES), through the architecture adapter: every block linear (MoE
experts and fused projections included) is calibrated, packed and reloaded bit for bit; a pruned
then quantized model reloads and fine-tunes; the bit-search evaluator computes what the model
computes. One CPU thread: these run ten families each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pqflow import architectures as arch
from pqflow import formats
from pqflow.calibration import STATS_FILE, WINDOWS_FILE, Calibration, collect_stats, decoder_linears
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import resolve_plan
from pqflow.models import LoadedModel, load_model_artifact, load_source
from pqflow.quant import QuantEmbedding, QuantLinear
from pqflow.quant.model import quantize_embeddings
from pqflow.tiny import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES)
# Longer than the tiny Gemmas' sliding window (32): sliding and global layers then differ.
SEQ = 48
FAST = {"steps": 1, "batch_size": 2, "seqlen": 32, "eval_every": 1, "eval_windows": 2, "threads": 1,
        "warmup_steps": 0, "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(family: str) -> LoadedModel:
    return load_source(f"tiny-{family}")  # the source loader prepares the model (MoE experts as linears)


def _ids(n: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _quantize(model: nn.Module, bits: int = 4, group: int | None = 32) -> None:
    rtn.quantize(model, None, resolve_plan(model, bits, group, False), rtn.Params())


def _role_linears(model: nn.Module) -> set[str]:
    return set(arch.block_linear_roles(model))


def _expert_linears(model: nn.Module) -> set[str]:
    return {n for n, r in arch.block_linear_roles(model).items() if r.startswith("expert.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_covers_every_block_linear(family: str):
    model = _load(family).model
    stats, aliases = collect_stats(model, _ids(4), batch_size=2, xtx=True, progress=False)
    linears = decoder_linears(model)
    assert set(linears) == _role_linears(model)  # every block linear carries a role; routers excluded
    owners = {k.rsplit(".", 1)[0] for k in stats}
    assert owners | set(aliases) == set(linears) and not owners & set(aliases)
    for name in owners:
        n_in = linears[name].in_features
        assert stats[f"{name}.sqnorm"].shape == (n_in,) and stats[f"{name}.xtx"].shape == (n_in, n_in)
    # aliases only inside a group reading one tensor: q/k/v and gate/up (one expert's gate/up)
    for name, owner in aliases.items():
        assert arch.block_of(name) == arch.block_of(owner) and linears[name].in_features == linears[owner].in_features
    if arch.family_of(model).is_moe:
        assert len(_expert_linears(model)) == 4 * 4 * 3  # 4 blocks x 4 experts x gate/up/down
        assert not any(arch.router(layer) is m for layer in arch.decoder_layers(model) for m in linears.values())


def test_an_expert_without_tokens_gets_zero_statistics():
    """One token, two experts of four per token: half of each block's experts see nothing."""
    model = _load("qwen3_moe").model
    stats, aliases = collect_stats(model, _ids(1, 1), batch_size=1, xtx=True, progress=False)
    experts = _expert_linears(model)
    idle = [n for n in experts if n not in aliases and not stats[f"{n}.sqnorm"].any()]
    assert len(idle) == 4 * 2 * 3  # per block: two idle experts, gate, up and down each (never run: no alias)
    assert all(not stats[f"{n}.xtx"].any() for n in idle)


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_packs_every_block_linear_and_reloads_bit_for_bit(family: str, tmp_path: Path):
    loaded = _load(family)
    model = loaded.model
    names = _role_linears(model)
    ids = _ids(2)
    _quantize(model)
    quantize_embeddings(model, 8, 8, 32, False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert not any(type(m) is nn.Linear for n, m in arch.named_block_linears(model))
    for layer in arch.decoder_layers(model):  # the router stays in floating point
        r = arch.router(layer)
        assert r is None or not isinstance(r, QuantLinear) and r.weight.is_floating_point()
    formats.save_model(model, loaded.tokenizer, tmp_path / "q", "pqflow-quant", method="rtn")
    ref = _logits(model, ids)
    again = load_model_artifact(tmp_path / "q").model
    assert all(isinstance(again.get_submodule(n), QuantLinear) for n in names)
    assert float((_logits(again, ids) - ref).abs().max()) == 0.0


def test_a_scaled_embedding_keeps_its_scale_when_quantized(tmp_path: Path):
    """Gemma 3 multiplies its embedding lookups by sqrt(hidden); the packed embedding must too."""
    loaded = _load("gemma3")
    model = loaded.model
    ids = _ids(1)
    ref = model.get_input_embeddings()(ids)
    quantize_embeddings(model, 8, None, None, False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.embed_scale is not None
    torch.testing.assert_close(emb(ids), ref, rtol=0.02, atol=0.05 * float(emb.embed_scale))
    formats.save_model(model, loaded.tokenizer, tmp_path / "q", "pqflow-quant")
    again = load_model_artifact(tmp_path / "q").model
    assert torch.equal(again.get_input_embeddings()(ids), emb(ids))


# Query heads and KV heads kept per block (of 4 over 2): block 1 keeps one query head per KV head
# (the attention's KV repeat changes from 2 to 1), block 3 one KV group.
HEADS = {1: ([0, 2], [0, 1]), 3: ([2, 3], [1])}


def _prune(model: nn.Module) -> None:
    """Cut each block differently, as far as the family allows: heads as in HEADS, block i keeps
    384 - 64 * i MLP channels."""
    for i, layer in enumerate(arch.decoder_layers(model)):
        if i in HEADS and arch.refusal(model, arch.HEAD_PRUNING) is None:
            arch.cut_heads(layer, *HEADS[i])
        if arch.refusal(model, arch.CHANNEL_PRUNING) is None:
            arch.cut_channels(layer, list(range(384 - 64 * i)))


def _train_data(n_train: int = 4096) -> object:
    from pqflow.methods.tuning.train import TrainData

    return TrainData(torch.randint(0, 256, (n_train,), generator=torch.Generator().manual_seed(1)), _ids(2, 32, 2))


def _base(folder: Path) -> object:
    from pqflow.methods.tuning.common import Base

    loaded = load_model_artifact(folder)
    return Base(loaded.model, loaded.tokenizer, json.loads((folder / "pqflow_model.json").read_text()), folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_quantized_model_reloads_and_finetunes(family: str, tmp_path: Path):
    """The packed skeleton of a pruned model gets its attention head counts from its reshaped
    linears (Gemma 2 once failed here: 'attention shape mismatch, 2 vs 4 heads')."""
    from pqflow.methods.tuning import lora, peqa
    from pqflow.stages.finetune import reload_diff

    loaded = _load(family)
    model = loaded.model
    _prune(model)
    _quantize(model)
    q = tmp_path / "q"
    formats.save_model(model, loaded.tokenizer, q, "pqflow-quant", method="rtn")
    ids = _ids(2)
    again = load_model_artifact(q).model
    assert [arch.geometry(a) for a in arch.decoder_layers(again)] == [arch.geometry(m) for m in
                                                                       arch.decoder_layers(model)]
    assert float((_logits(again, ids) - _logits(model, ids)).abs().max()) == 0.0
    for m in (model, again):  # eager attention repeats KV heads by the attention's own count
        m.set_attn_implementation("eager")
    assert float((_logits(again, ids) - _logits(model, ids)).abs().max()) == 0.0
    data = _train_data()
    tuned = peqa.tune(_base(q), data, peqa.Params(**FAST, lr=1e-3), tmp_path / "peqa")
    assert tuned.history.steps_done == 1 and reload_diff(tuned.model, tmp_path / "peqa", ids[:1]) == 0.0
    tuned = lora.tune(_base(q), data, lora.Params(**FAST, lr=1e-3), tmp_path / "lora")
    adapted = [n for n, m in tuned.model.named_modules() if hasattr(m, "lora_A")]
    assert tuned.info["adapted_linears"] == len(adapted) == len(_role_linears(model))
    assert reload_diff(tuned.model, tmp_path / "lora", ids[:1]) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_linears_of_the_roles(family: str):
    from peft.tuners.lora.layer import LoraLayer

    from pqflow.methods.tuning import lora

    model = _load(family).model
    roles = arch.block_linear_roles(model)
    assert set(lora.target_linears(model, lora.ALL_ROLES)) == set(roles)
    only_q = lora.target_linears(model, ["q", "down"])
    assert only_q == [n for n, r in roles.items() if arch.role_set(r) & {"q", "down"}]
    if family == "phi3":  # q lives in the fused projection, which is adapted as a whole
        assert all(roles[n] in ("q,k,v", "down") for n in only_q)
    if family == "qwen3_moe":  # every expert's down
        assert len([n for n in only_q if roles[n].startswith("expert.")]) == 4 * 4
    peft_model = lora._wrap(model, lora.Params(r=2), only_q)
    adapted = {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(only_q)
    with pytest.raises(ValueError, match="name no linear"):
        lora.target_linears(model, ["q", "nope"])


def _calibration(model: nn.Module, folder: Path) -> Calibration:
    windows = _ids(4, 32, 3)
    stats, aliases = collect_stats(model, windows, batch_size=2, xtx=True, progress=False)
    folder.mkdir()
    save_file({"input_ids": windows}, folder / WINDOWS_FILE)
    save_file(stats, folder / STATS_FILE)
    return Calibration(folder, {"aliases": aliases, "xtx": True})


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_search_evaluator_and_prior(family: str, tmp_path: Path):
    import torch.nn.functional as F

    from pqflow.methods.bitsearch import importance_prior
    from pqflow.methods.bitsearch.context import SearchContext
    from pqflow.methods.bitsearch.evaluator import Evaluator
    from pqflow.methods.bitsearch.space import SearchSpace, parse_choice
    from pqflow.methods.bitsearch.targets import TARGETS

    model = _load(family).model
    heldout = _ids(2, SEQ, 4)
    space = SearchSpace.build(model, "linear", [parse_choice("2g32"), parse_choice("4g32"), parse_choice("16")],
                              tie=TARGETS["vllm"].tie(model))
    ev = Evaluator(model, space, heldout, "kl")
    # Block by block, with each block's own mask and rotary embedding, the evaluator computes
    # what the model computes (final norm, head and logit soft-capping or scaling included).
    logits = _logits(model, heldout)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), heldout[:, 1:].reshape(-1))
    assert ev.fp_nll == pytest.approx(float(nll), rel=1e-5)
    assert ev.measure(space.uniform(parse_choice("16"))).kl == pytest.approx(0.0, abs=1e-4)  # fp16 weights
    ctx = SearchContext(model, space, space.budget(3.0, None), heldout, calib=_calibration(model, tmp_path / "c"),
                        progress=False, _evaluator=ev)
    ctx.prior_settings.mi_windows = 4
    for prior in ("error", "sensitivity", "mi"):
        t = importance_prior.search(ctx, importance_prior.Params(prior=prior))
        assert t.bytes <= ctx.budget and t.objective >= 0
    tied = [mods for mods in space.unit_modules if len(mods) > 1]
    assert all(len({arch.block_of(m) for m in mods}) == 1 for mods in tied)
    # phi3's q/k/v and gate/up are fused already: nothing left to tie
    assert len(tied) == (0 if family == "phi3" else 4 * 2)  # per block: q+k+v and gate+up (or the experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_format_round_trip(family: str, tmp_path: Path):
    """The hf format holds the prepared model's weights (MoE experts as linears) and reads them back."""
    loaded = _load(family)
    formats.save_model(loaded.model, loaded.tokenizer, tmp_path / "m", "hf")
    again = load_model_artifact(tmp_path / "m").model
    assert set(_role_linears(again)) == set(_role_linears(loaded.model))
    ids = _ids(2)
    assert torch.equal(_logits(again, ids), _logits(loaded.model, ids))


def test_bitsandbytes_quantizes_moe_experts(tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    from pqflow.methods.quant import bnb

    loaded = _load("qwen3_moe")
    model = loaded.model
    experts = _expert_linears(model)
    qmodel = bnb.convert(model, resolve_plan(model, 8, None, True), "int8")
    assert all(type(qmodel.get_submodule(n)).__name__ == "Linear8bitLt" for n in experts)
    assert all(arch.router(layer).weight.is_floating_point() for layer in arch.decoder_layers(qmodel))
    formats.save_model(qmodel, loaded.tokenizer, tmp_path / "b", "pqflow-bnb", method="bnb-int8")
    again = load_model_artifact(tmp_path / "b").model
    assert all(type(again.get_submodule(n)).__name__ == "Linear8bitLt" for n in experts)
    ids = _ids(2)
    assert torch.equal(_logits(again, ids), _logits(qmodel, ids))


@pytest.mark.parametrize("family", ["gemma3", "phi3", "qwen3_moe"])
def test_stages_calibrate_bit_search_quantize(family: str, tiny_recipe, tmp_path: Path):
    """The stages end to end on a family other than Llama: the allocation names the family's
    linears and the quantize stage packs exactly those."""
    from pqflow.runner import run_stage

    r = tiny_recipe
    r.model.source = f"tiny-{family}"
    r.stages.calibrate.n_windows = 4
    r.stages.bit_search.enabled = True
    r.stages.bit_search.method = "importance-prior"
    r.stages.bit_search.avg_bits = 6.0  # between all 4g32 (4.75 bits) and all 8g32
    r.stages.bit_search.choices = ["2g32", "4g32", "8g32"]  # vllm drops 2g32
    r.stages.bit_search.target = "vllm"
    r.stages.bit_search.heldout_windows = 2
    r.stages.bit_search.heldout_seqlen = SEQ
    r.stages.quantize.enabled = True
    r.stages.quantize.method = "rtn"
    cal = run_stage("calibrate", r, {}, f"file://{tmp_path}/cal")
    bits = run_stage("bit-search", r, {"calib": cal.uri}, f"file://{tmp_path}/bits")
    alloc = json.loads((tmp_path / "bits" / "allocation.json").read_text())
    names = _role_linears(_load(family).model)
    assert set(alloc["modules"]) == names
    q = run_stage("quantize", r, {"calib": cal.uri, "allocation": bits.uri}, f"file://{tmp_path}/q")
    assert q.summary["quantized_linears"] == len(names)
    model = load_model_artifact(tmp_path / "q").model
    assert {n: model.get_submodule(n).bits for n in names} == {n: e["bits"] for n, e in alloc["modules"].items()}
