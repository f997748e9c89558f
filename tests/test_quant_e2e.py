"""E2E scale distillation on the tiny model: same codes and bytes as its initialiser, closer logits."""

import torch

from pqflow.methods.quant import e2e, rtn
from pqflow.methods.quant.plan import resolve_plan
from pqflow.quant import QuantLinear
from pqflow.quant.model import quantized_modules
from pqflow.tiny import tiny_llama


def _windows(n, seed):
    return torch.randint(0, 256, (n, 64), generator=torch.Generator().manual_seed(seed))


def _kl(model, ref, ev):
    with torch.no_grad():
        return float(e2e.token_kl(model(input_ids=ev).logits, torch.log_softmax(ref(input_ids=ev).logits, -1)))


def test_e2e_keeps_codes_and_lowers_heldout_kl(tiny):
    ref, _ = tiny
    calib, ev = _windows(32, 0), _windows(8, 1)
    r, _ = tiny_llama(seed=0)
    rtn.quantize(r, None, resolve_plan(r, 3, 32, False), rtn.Params())
    m, _ = tiny_llama(seed=0)
    e2e.quantize(m, calib, resolve_plan(m, 3, 32, False), e2e.Params(init="rtn", steps=60, batch_windows=4))
    got, init = quantized_modules(m), quantized_modules(r)
    assert got.keys() == init.keys() and all(isinstance(q, QuantLinear) for q in got.values())
    for n, q in got.items():  # codes, zeros and bytes are the initialiser's; only the scales moved
        assert torch.equal(q.qweight, init[n].qweight) and torch.equal(q.zeros, init[n].zeros)
        assert q.scales.dtype == torch.float16 and q.nbytes == init[n].nbytes
    assert sum(not torch.equal(q.scales, init[n].scales) for n, q in got.items()) == len(got)
    errs = m.quant_errors
    assert errs["kl_after"] < 0.7 * errs["kl_before"], errs
    # held out: windows the distillation never saw
    assert _kl(m, ref, ev) < 0.9 * _kl(r, ref, ev)  # 0.82 here: random tokens over-fit


def test_e2e_zero_steps_is_its_initialiser(tiny):
    calib = _windows(4, 0)
    m, _ = tiny_llama(seed=0)
    r, _ = tiny_llama(seed=0)
    e2e.quantize(m, calib, resolve_plan(m, 4, 32, False), e2e.Params(init="rtn", steps=0))
    rtn.quantize(r, None, resolve_plan(r, 4, 32, False), rtn.Params())
    for n, q in quantized_modules(m).items():
        assert torch.equal(q.scales, r.get_submodule(n).scales)


def test_e2e_needs_calibration(tiny):
    import pytest

    model, _ = tiny
    with pytest.raises(ValueError, match="calibration"):
        e2e.quantize(model, None, resolve_plan(model, 4, 32, False), e2e.Params())


def test_e2e_learned_rounding_moves_codes_on_the_grid(tiny):
    from pqflow.methods.quant.plan import resolve_plan as plan_of

    calib = _windows(32, 0)
    r, _ = tiny_llama(seed=0)
    rtn.quantize(r, None, plan_of(r, 3, 32, False), rtn.Params())
    m, _ = tiny_llama(seed=0)
    e2e.quantize(m, calib, plan_of(m, 3, 32, False),
                 e2e.Params(init="rtn", steps=60, batch_windows=4, rounding="learned", code_lr=0.05))
    moved = 0
    for n, q in quantized_modules(m).items():
        c, c0 = q.codes().long(), r.get_submodule(n).codes().long()
        assert int(c.max()) <= 7 and q.nbytes == r.get_submodule(n).nbytes
        assert int((c - c0).abs().max()) <= 2  # a latent decayed to 0 travels at most 60 x 0.05 / 2 levels
        moved += int((c != c0).sum())
    assert moved > 0
    assert m.quant_errors["kl_after"] < 0.7 * m.quant_errors["kl_before"]
