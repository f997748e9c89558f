"""Block-wise onloading and per-block arguments of the block-by-block quantizers.

- GPTQ and MREM with a compute ``device`` (one block moved there at a time, hidden states on the
  device or offloaded) give bit-identical models to the plain run on the CPU, and only one block
  (MREM: one module's blocks) is ever onloaded: every move goes through ``blocks.move_block``,
  which the tests replace by a counter;
- a model loaded from safetensors (memory-mapped) quantizes to the same bytes as in memory;
- every block gets its own mask and rotary embedding: on a Gemma 3 with sliding and global layers,
  running the blocks from the captured inputs with their own arguments reproduces the model's
  forward exactly (with block 0's arguments for every block it does not);
- an MoE expert that no calibration token reaches is quantized (zero Hessian), not crashed on.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pqflow.architectures import block_names, decoder_layers, experts, prepare, router
from pqflow.methods.quant import blocks, gptq, mrem
from pqflow.methods.quant.plan import resolve_plan
from pqflow.quant import QuantLinear
from pqflow.tiny import TINY_FAMILIES, tiny_family_config, tiny_llama, tiny_model


def _windows(n: int, seed: int, seqlen: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class MoveCounter:
    """Stands in for ``blocks.move_block``: which blocks are onloaded now, the most at once, and
    the order blocks were onloaded in (a move to the compute device, then one back home)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.index = {id(b): i for i, b in enumerate(decoder_layers(model))}
        self.on: set[int] = set()
        self.most = 0
        self.order: list[int] = []

    def __call__(self, block: torch.nn.Module, device: torch.device) -> None:
        i = self.index[id(block)]
        if i in self.on:
            self.on.remove(i)
        else:
            self.on.add(i)
            self.order.append(i)
            self.most = max(self.most, len(self.on))
        block.to(device)


@pytest.mark.parametrize("offload", [False, True])
def test_gptq_onloading_is_bit_identical_and_one_block_at_a_time(monkeypatch, offload):
    calib = _windows(8, 0)
    ref, _ = tiny_llama(seed=0)
    gptq.quantize(ref, calib, resolve_plan(ref, 3, 32, False), gptq.Params(batch_size=3))
    m, _ = tiny_llama(seed=0)
    moves = MoveCounter(m)
    monkeypatch.setattr(blocks, "move_block", moves)
    gptq.quantize(m, calib, resolve_plan(m, 3, 32, False), gptq.Params(batch_size=3, offload_hidden=offload),
                  device="cpu")
    assert moves.most == 1 and moves.order == list(range(len(decoder_layers(m)))) and not moves.on
    _same_state(ref, m)
    assert m.quant_errors == ref.quant_errors


@pytest.mark.parametrize("params", [
    {"steps": 4, "n_windows": 8, "blocks_per_module": 2, "anneal": True},
    {"steps": 4, "n_windows": 8, "inputs": "fp"},
])
def test_mrem_onloading_is_bit_identical(monkeypatch, params):
    calib = _windows(8, 0)
    ref, _ = tiny_llama(seed=0)
    mrem.quantize(ref, calib, resolve_plan(ref, 3, 32, False), mrem.Params(**params))
    m, _ = tiny_llama(seed=0)
    moves = MoveCounter(m)
    monkeypatch.setattr(blocks, "move_block", moves)
    mrem.quantize(m, calib, resolve_plan(m, 3, 32, False), mrem.Params(**params, offload_hidden=True), device="cpu")
    assert moves.most == params.get("blocks_per_module", 1) and not moves.on
    _same_state(ref, m)
    assert m.quant_errors == ref.quant_errors


def test_gptq_on_a_memory_mapped_model(tmp_path):
    """Weights read from safetensors by transformers (pages of the file) quantize like in-memory ones."""
    from pqflow.models import load_source

    calib = _windows(4, 0)
    ref, tok = tiny_llama(seed=0)
    ref.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_source(f"hf:{tmp_path / 'm'}").model
    for model, dev in ((ref, None), (loaded, "cpu")):
        gptq.quantize(model, calib, resolve_plan(model, 4, 32, False), gptq.Params(), device=dev)
    _same_state(ref, loaded)


def _gemma3_mixed(seed: int = 0) -> torch.nn.Module:
    """Tiny Gemma 3 whose layers alternate sliding and global attention (the tiny source has only
    sliding layers: four layers are fewer than Gemma 3's pattern of six)."""
    cfg = tiny_family_config("gemma3")
    cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return prepare(model.eval())


def _block_inputs_of_forward(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each block receives, and the last block's output, in the model's own forward."""
    seen: list[torch.Tensor] = []
    layers = decoder_layers(model)
    hooks = [b.register_forward_pre_hook(lambda _m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                         with_kwargs=True) for b in layers]
    hooks.append(layers[-1].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def test_gemma3_blocks_get_their_own_mask_and_rotary():
    model = _gemma3_mixed()
    ids = _windows(4, 0, seqlen=96)  # longer than the sliding window (32): the masks differ
    ref = _block_inputs_of_forward(model, ids)
    x = blocks.capture_inputs(model, ids, batch_size=3)
    kw = x.layer_kwargs
    cos = [k["position_embeddings"][0] for k in kw]
    assert len(kw) == 4 and cos[0] is cos[2] and cos[1] is cos[3]  # one tensor per layer type, not per block
    assert not torch.equal(cos[0], cos[1])  # Gemma 3: sliding and global layers have their own rotary
    torch.testing.assert_close(x.hidden, ref[0], rtol=0, atol=0)
    h = x.hidden.clone()
    with torch.no_grad():
        for i, blk in enumerate(decoder_layers(model)):
            h = blocks.run_block(blk, x.with_hidden(h).for_block(i))
            torch.testing.assert_close(h, ref[i + 1], rtol=1e-6, atol=1e-6)
        wrong = x.hidden.clone()
        for blk in decoder_layers(model):  # block 0's arguments everywhere: what capture used to do
            wrong = blocks.run_block(blk, x.with_hidden(wrong))
    assert (wrong - ref[-1]).abs().max() > 1e-3


def test_gptq_8bit_gemma3_stays_close_to_fp():
    model = _gemma3_mixed()
    ev = _windows(2, 1, seqlen=96)
    with torch.no_grad():
        fp = model(input_ids=ev).logits
    gptq.quantize(model, _windows(8, 0, seqlen=96), resolve_plan(model, 8, 32, False), gptq.Params(batch_size=4))
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in resolve_plan(_gemma3_mixed(), 8, 32, False))
    with torch.no_grad():
        q = model(input_ids=ev).logits
    assert float((q - fp).pow(2).mean() / fp.pow(2).mean()) < 1e-3
    assert set(model.quant_errors) and max(model.quant_errors.values()) < 1e-3


def test_gptq_moe_expert_without_tokens():
    """Routing never picks the last expert: its linears get no input, a zero Hessian; GPTQ then
    rounds them on the grid (the identity as Hessian) instead of failing or zeroing them."""
    model = prepare(tiny_model("qwen3_moe", seed=0)[0])
    last = len(experts(decoder_layers(model)[0])) - 1

    def avoid_last(_m, _a, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == last, torch.zeros_like(idx), idx)

    for blk in decoder_layers(model):
        router(blk).register_forward_hook(avoid_last)
    block0 = block_names(model)[0]
    path, lin = experts(decoder_layers(model)[0])[last]["down"]
    w = lin.weight.detach().clone()
    gptq.quantize(model, _windows(4, 0), resolve_plan(model, 4, 32, False), gptq.Params())
    q = model.get_submodule(f"{block0}.{path}")
    assert isinstance(q, QuantLinear)
    rel = float((q.dequantize().detach() - w).norm() / w.norm())
    assert rel < 0.15, rel


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
@pytest.mark.parametrize("method", ["gptq", "mrem"])
def test_block_quantizers_on_every_family(family, method):
    """GPTQ and MREM through the adapter on every family: every planned linear (experts, fused
    projections included) is packed and 8-bit logits stay close to the float model's."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = prepare(tiny_model(family, seed=0)[0])
        ev = _windows(2, 1, seqlen=48)  # longer than the Gemmas' sliding window (32)
        with torch.no_grad():
            fp = model(input_ids=ev).logits
        plan = resolve_plan(model, 8, 32, False)
        mod, params = (gptq, gptq.Params(batch_size=2)) if method == "gptq" else \
            (mrem, mrem.Params(steps=2, n_windows=4, gptq=gptq.Params(batch_size=2)))
        mod.quantize(model, _windows(4, 0, seqlen=48), plan, params, device="cpu")
        assert all(isinstance(model.get_submodule(name), QuantLinear) for name in plan)
        with torch.no_grad():
            q = model(input_ids=ev).logits
        assert float((q - fp).pow(2).mean() / fp.pow(2).mean()) < 1e-3
    finally:
        torch.set_num_threads(n)
