"""Packed low-bit layers, RTN / GPTQ, the pqflow-quant format and the quantize stage (tiny model)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pqflow import architectures as arch
from pqflow.artifacts import build_manifest, publish
from pqflow.methods.quant import gptq, rtn
from pqflow.methods.quant.plan import LinearSpec, resolve_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.quant import QuantLinear, packed_bytes
from pqflow.quant.grid import fake_quantize
from pqflow.quant.model import FORMAT, quantize_embeddings, save_quantized
from pqflow.quant.packing import pack, packed_len, unpack
from pqflow.quant.report import folder_tensor_sizes, module_bytes
from pqflow.runner import run_stage
from pqflow.tiny import tiny_llama

BITS = (2, 3, 4, 8)


def _proj(model: nn.Module, block: int, role: str) -> arch.Proj:
    return arch.projections(arch.decoder_layers(model)[block])[role]


def _name(model: nn.Module, block: int, role: str) -> str:
    """The full module name of a role's linear in block ``block``."""
    return f"{arch.block_names(model)[block]}.{_proj(model, block, role).name}"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 5, 8, 13, 576 * 3 + 5])
def test_pack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_len(n, bits)
    assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_three_bit_is_dense():
    assert packed_len(8, 3) == 3 and packed_len(576 * 64, 3) == 576 * 64 * 3 // 8
    with pytest.raises(ValueError):
        pack(torch.tensor([8]), 3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 64, 128])  # 576 % 128 = 64: a ragged last group
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantlinear_matches_reference_fake_quant(bits, group_size, symmetric):
    torch.manual_seed(bits)
    lin = nn.Linear(576, 40, bias=True)
    q = QuantLinear.from_linear(lin, bits, group_size, symmetric)
    ref = fake_quantize(lin.weight.detach(), bits, group_size, symmetric, scale_dtype=torch.float16)
    torch.testing.assert_close(q.dequantize(), ref, rtol=0, atol=0)
    x = torch.randn(3, 576)
    torch.testing.assert_close(q(x), nn.functional.linear(x, ref, lin.bias.detach().half().float()))
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert stored == q.nbytes == packed_bytes(40, 576, bits, group_size, torch.float16, symmetric, bias=True)
    if group_size == 128:
        assert q.scales.shape == (40, 5)  # 4 groups of 128 + the ragged last one of 64


def test_scales_are_the_trainable_part():
    q = QuantLinear.from_linear(nn.Linear(128, 16), 4, 64)
    assert [n for n, _ in q.named_parameters()] == ["scales", "bias"]
    q(torch.randn(2, 128)).sum().backward()
    assert q.scales.grad is not None and q.scales.grad.abs().sum() > 0


def _calib(n=16, seqlen=64, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_gptq_beats_rtn_on_layer_output(tiny):
    model, _ = tiny
    name = _name(model, 1, "down")
    lin = model.get_submodule(name)
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=_calib())
    h.remove()
    x = torch.cat(seen)
    H = 2 * x.T @ x / len(x)
    spec = LinearSpec(3, 64, False)
    for act_order in (False, True):
        codes, s, z = gptq.gptq_weight(lin.weight, H, spec, act_order=act_order, clip_search=False)
        qg = QuantLinear.from_linear(lin, 3, 64, codes=codes, scales=s, zeros=z)
        qr = QuantLinear.from_linear(lin, 3, 64)
        with torch.no_grad():
            ref = lin(x)
            e_g = (qg(x) - ref).pow(2).mean()
            e_r = (qr(x) - ref).pow(2).mean()
        assert e_g < 0.8 * e_r, (act_order, float(e_g), float(e_r))


def test_gptq_model_closer_than_rtn(tiny):
    from pqflow.tiny import tiny_llama

    model, _ = tiny
    ev = _calib(4, 64, seed=1)
    with torch.no_grad():
        ref = model(input_ids=ev).logits
    errs = {}
    for name, mod, params in (("rtn", rtn, rtn.Params()), ("gptq", gptq, gptq.Params())):
        m, _ = tiny_llama(seed=0)
        mod.quantize(m, _calib(), resolve_plan(m, 3, 64, False), params)
        assert all(isinstance(m.get_submodule(n), QuantLinear) for n in resolve_plan(model, 3, 64, False))
        with torch.no_grad():
            errs[name] = float((m(input_ids=ev).logits - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


RELOAD = """
import sys, torch
from pqflow.models import load_model_artifact
m = load_model_artifact(sys.argv[1]).model
with torch.no_grad():
    print(m(input_ids=torch.load(sys.argv[2], weights_only=True)).logits.double().sum().item())
"""


def _logit_sum_fresh_process(folder: Path, ids: torch.Tensor, tmp: Path) -> float:
    torch.save(ids, tmp / "ids.pt")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(folder), str(tmp / "ids.pt")],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_save_reload_identical_and_small(tiny, tmp_path: Path):
    model, tok = tiny
    fp_dir = save_model(model, tok, tmp_path / "fp16", saver=lambda m, t, o: _save_fp16(m, t, o))
    plan = resolve_plan(model, 4, 64, False)
    plan[_name(model, 0, "q")] = LinearSpec(3, 32, True)
    plan[_name(model, 0, "up")] = LinearSpec(2, None, False)
    plan[_name(model, 2, "down")] = LinearSpec(8, None, False)
    rtn.quantize(model, None, plan, rtn.Params())
    out = save_model(model, tok, tmp_path / "q", fmt=FORMAT, saver=save_quantized)
    ids = _calib(2, 32, seed=3)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    again = load_model_artifact(out).model
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)
    assert _logit_sum_fresh_process(out, ids, tmp_path) == logits.double().sum().item()
    names = sorted(resolve_plan(again, 4, 64, False).keys() | plan.keys())
    q4 = [n for n in names if plan[n] == LinearSpec(4, 64, False)]
    q_bytes = module_bytes(folder_tensor_sizes(out), q4)
    fp_bytes = module_bytes(folder_tensor_sizes(fp_dir), q4)
    assert q_bytes <= 0.32 * fp_bytes, (q_bytes, fp_bytes)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def _save_fp16(model, tok, out):
    import copy

    copy.deepcopy(model).half().save_pretrained(out)
    return {}


def test_pruned_shapes_and_quantized_embeddings_reload(tiny, tmp_path: Path):
    model, tok = tiny
    arch.cut_channels(arch.decoder_layers(model)[1], list(range(200)))  # an unevenly pruned block: 384 -> 200
    plan = resolve_plan(model, 4, 64, False)
    del plan[_name(model, 3, "o")]  # one linear left in floating point
    rtn.quantize(model, None, plan, rtn.Params())
    info = quantize_embeddings(model, 8, None, 64, False)
    assert info["lm_head"]["tied"]
    out = save_model(model, tok, tmp_path / "q", fmt=FORMAT, saver=save_quantized)
    ids = _calib(2, 32, seed=4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        # The tied head computes with the embedding's own codes.
        emb = model.get_input_embeddings()
        h = torch.randn(1, 128)
        torch.testing.assert_close(model.get_output_embeddings()(h), h @ emb.dequantize().T)
    again = load_model_artifact(out).model
    assert _proj(again, 1, "down").in_features == 200
    assert type(_proj(again, 3, "o").module) is nn.Linear
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)
    sizes = folder_tensor_sizes(out)
    assert "lm_head.weight" not in sizes and sizes["model.embed_tokens.qweight"] == 320 * 128


def _allocation_artifact(root: Path, modules: dict) -> str:
    work = root / "alloc-work"
    work.mkdir()
    (work / "allocation.json").write_text(json.dumps({"modules": modules}))
    manifest = build_manifest(work, stage="bit-search", params={}, inputs={}, fingerprint="test")
    uri = f"file://{root}/alloc"
    publish(work, uri, manifest)
    return uri


def test_quantize_stage_runs_with_allocation(tiny_recipe, tmp_path: Path):
    tiny_recipe.stages.quantize.enabled = True
    tiny_recipe.stages.quantize.method = "gptq"
    tiny_recipe.stages.quantize.params = {"n_windows": 4}
    cal = run_stage("calibrate", tiny_recipe, {}, f"file://{tmp_path}/cal")
    ref, _ = tiny_llama()
    q0, down1, up2 = _name(ref, 0, "q"), _name(ref, 1, "down"), _name(ref, 2, "up")
    alloc = _allocation_artifact(tmp_path, {
        q0: {"bits": 8, "group_size": None},
        down1: {"bits": 16},
        up2: {"bits": 3},
    })
    res = run_stage("quantize", tiny_recipe, {"calib": cal.uri, "allocation": alloc}, f"file://{tmp_path}/q")
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["plan"][q0] == {"bits": 8, "group_size": None, "symmetric": False}
    assert down1 not in report["plan"]
    assert report["plan"][up2]["bits"] == 3
    assert res.summary["quantized_linears"] == 27 and 4 < res.summary["avg_bits"] < 5
    m = load_model_artifact(tmp_path / "q").model
    assert m.get_submodule(q0).bits == 8
    assert type(m.get_submodule(down1)) is nn.Linear
    assert run_stage("quantize", tiny_recipe, {"calib": cal.uri, "allocation": alloc}, f"file://{tmp_path}/q").skipped


def test_quantize_without_calib_input_reruns_when_calibrate_changes(tiny_recipe, tmp_path: Path):
    """Without a calib input the stage draws its windows as calibrate would, so calibrate's
    settings are part of its fingerprint."""
    tiny_recipe.stages.quantize.enabled = True
    tiny_recipe.stages.quantize.method = "gptq"
    out = f"file://{tmp_path}/q"
    assert not run_stage("quantize", tiny_recipe, {}, out).skipped
    assert run_stage("quantize", tiny_recipe, {}, out).skipped
    tiny_recipe.stages.calibrate.n_windows += 2
    assert not run_stage("quantize", tiny_recipe, {}, out).skipped
    cal = run_stage("calibrate", tiny_recipe, {}, f"file://{tmp_path}/cal")
    with_calib = run_stage("quantize", tiny_recipe, {"calib": cal.uri}, out)
    tiny_recipe.stages.calibrate.n_windows += 2  # the calib artifact decides now, not the recipe
    assert run_stage("quantize", tiny_recipe, {"calib": cal.uri}, out).skipped
    assert not with_calib.skipped


def test_bad_allocation_is_one_clear_error(tiny_recipe, tmp_path: Path):
    from pqflow.errors import PqflowError

    tiny_recipe.stages.quantize.enabled = True
    ref, _ = tiny_llama()
    missing = f"{arch.layers_prefix(ref)}.9.{_proj(ref, 0, 'up').name}"  # the tiny model has 4 blocks
    alloc = _allocation_artifact(tmp_path, {missing: {"bits": 4}})
    with pytest.raises(PqflowError, match=f"{re.escape(missing)}: no such decoder linear"):
        run_stage("quantize", tiny_recipe, {"allocation": alloc}, f"file://{tmp_path}/q")
    assert not (tmp_path / "q").exists()


def test_bnb_int8_stage(tiny_recipe, tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    tiny_recipe.stages.quantize.enabled = True
    tiny_recipe.stages.quantize.method = "bnb-int8"
    res = run_stage("quantize", tiny_recipe, {}, f"file://{tmp_path}/q")
    assert res.summary["quantized_linears"] == 28 and res.summary["avg_bits"] < 9
    m = load_model_artifact(tmp_path / "q").model
    assert type(_proj(m, 0, "down").module).__name__ == "Linear8bitLt"
