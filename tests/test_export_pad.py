"""``uneven: pad``: a model pruned to other widths per layer, zero-padded to the widest layer so a
standard config holds it, computes exactly what the pruned model computes, in pqflow and in plain
transformers; padded weights are zero-point codes, so a padded quantized layer stays packed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqflow.artifacts import build_manifest, open_artifact, publish, staging_dir
from pqflow.cli import main
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.export import ExportError, ExportOptions, export_artifact
from pqflow.export.dense import layer_widths
from pqflow.export.pad import PAD, pad_quant, pad_uniform
from pqflow.methods.prune.format import FORMAT as PRUNED
from pqflow.methods.prune.plan import LayerKeep, PrunePlan
from pqflow.methods.prune.surgery import apply_plan
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import LinearSpec, resolve_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.perplexity import perplexity
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import FORMAT, save_quantized

from .test_export import BLOCKS, linear_name

# tiny Llama: 4 query heads of 32 in 2 KV groups, MLP 384. Layer 0 stays whole.
UNEVEN = {
    1: LayerKeep(heads=[0, 1], kv=[0], channels=list(range(0, 384, 3)) + list(range(1, 384, 3))),  # 1 KV group
    2: LayerKeep(heads=[1, 3], kv=[0, 1], channels=list(range(320))),  # one query head per KV head
    3: LayerKeep(heads=[0, 1, 2, 3], kv=[0, 1], channels=list(range(100, 292))),
}
# schemes the padding must keep exact: symmetric, per channel, 8-bit, groups narrower than a head
SCHEMES = {
    linear_name(1, "q"): LinearSpec(4, 32, True),
    linear_name(1, "o"): LinearSpec(3, None, False),
    linear_name(2, "o"): LinearSpec(4, 16, True),
    linear_name(2, "down"): LinearSpec(8, None, True),
    linear_name(3, "down"): LinearSpec(2, 32, False),
}


def _publish(model, tok, uri: Path, **save_kw) -> str:
    work = staging_dir(str(uri))
    save_model(model, tok, work, **save_kw)
    publish(work, str(uri), build_manifest(work, stage="quantize", params={}, inputs={}, fingerprint="t"))
    return str(uri)


def _uneven(tiny, tmp_path: Path, quantize: bool = True) -> str:
    model, tok = tiny
    assert not apply_plan(model, PrunePlan(keep=UNEVEN))  # uneven
    if not quantize:
        return _publish(model, tok, tmp_path / "pruned", fmt=PRUNED)
    plan = resolve_plan(model, 4, 32, False)
    plan.update(SCHEMES)
    rtn.quantize(model, None, plan, rtn.Params())
    return _publish(model, tok, tmp_path / "quant", fmt=FORMAT, saver=save_quantized)


def _windows(tok) -> torch.Tensor:
    return eval_windows(tokenize(tok, load_text("wikitext2", "test")), 64, 4)


@pytest.mark.parametrize("quantize", [True, False])
def test_padding_computes_what_the_pruned_model_computes(tiny, tmp_path, quantize):
    loaded = load_model_artifact(Path(_uneven(tiny, tmp_path, quantize)))
    model, windows = loaded.model.eval(), _windows(loaded.tokenizer)
    with torch.no_grad():
        before = model(input_ids=windows).logits
    summary = pad_uniform(model)
    assert summary["to"] == {"n_heads": 4, "n_kv_heads": 2, "intermediate": 384}
    assert summary["layers"] == [1, 2, 3] and summary["padded_weights"] > 0
    assert len(set(layer_widths(model))) == 1
    with torch.no_grad():
        after = model(input_ids=windows).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(packed) == (28 if quantize else 0)  # padded layers stay packed
    assert pad_uniform(model) is None  # uniform now: nothing to do


def test_padded_codes_are_zero_points_and_keep_the_real_ones(tiny):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 4, bias=False)
    for sym in (False, True):
        q = QuantLinear.from_linear(lin, 4, 32, sym)
        rows = torch.tensor([0, PAD, 1, 2, 3, PAD])
        cols = torch.cat([torch.arange(64), torch.full((32,), PAD), torch.arange(64, 96)])
        p = pad_quant("x", q, rows, cols)
        w, pw = q.dequantize(), p.dequantize()
        assert pw.shape == (6, 128)
        real_rows = rows != PAD
        assert torch.equal(pw[real_rows][:, cols != PAD], w)
        assert not pw[~real_rows].any() and not pw[:, cols == PAD].any()


def test_padding_inside_a_quantization_group_is_refused_by_name():
    lin = torch.nn.Linear(96, 4, bias=False)
    q = QuantLinear.from_linear(lin, 4, 64, False)
    cols = torch.cat([torch.arange(32), torch.full((32,), PAD), torch.arange(32, 96)])  # splits group 0
    with pytest.raises(ExportError, match=rf"^{re.escape(linear_name(5, 'o'))}: padding inserts zero columns"):
        pad_quant(linear_name(5, "o"), q, None, cols)


def test_padded_hf_dense_scores_pqflow_ppl_in_plain_transformers(tiny, tmp_path):
    from .test_export import SCORE  # the plain-transformers scorer (never imports pqflow)

    src = _uneven(tiny, tmp_path)
    out = tmp_path / "dense"
    res = export_artifact(src, "hf-dense", f"file://{out}", ExportOptions(dtype="float32", uneven="pad"))
    assert res["padded"]["layers"] == [1, 2, 3]
    open_artifact(str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 384)
    assert "pqflow_layer_shapes" not in cfg
    loaded = load_model_artifact(Path(src))
    windows = _windows(loaded.tokenizer)
    ours = perplexity(loaded.model, windows, progress=False).ppl
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(windows.tolist()))
    run = subprocess.run([sys.executable, "-c", SCORE, str(out), str(ids)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])["ppl"]
    assert abs(theirs - ours) / ours < 1e-5, (theirs, ours)


def test_cli_pads_on_request_and_refuses_by_default(tiny, tmp_path, capsys):
    src = _uneven(tiny, tmp_path)
    capsys.readouterr()
    assert main(["export", src, "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{BLOCKS}.1" in err and "--uneven pad" in err
    assert not (tmp_path / "ct").exists()
    assert main(["export", src, "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--uneven", "pad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["padded"]["to"]["intermediate"] == 384 and summary["bytes"] > 0
    open_artifact(str(tmp_path / "ct"))


def test_native_pads_where_the_format_has_no_per_layer_widths(tiny, tmp_path):
    src = _uneven(tiny, tmp_path)
    res = export_artifact(src, "hf-dense", f"file://{tmp_path}/dense", ExportOptions(uneven="native"))
    assert res["padded"]["to"] == {"n_heads": 4, "n_kv_heads": 2, "intermediate": 384}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_padding_through_the_adapter_keeps_each_familys_output(family):
    """The roles come from the architecture adapter: Qwen2's q/k/v biases are padded with zeros,
    Qwen3's and Gemma 3's per-head q/k norms see zero heads, Gemma's sandwich norms are untouched."""
    from pqflow.architectures import prepare
    from pqflow.tiny import tiny_model

    model, _ = tiny_model(family)
    prepare(model)
    assert not apply_plan(model, PrunePlan(keep=UNEVEN))
    ids = torch.tensor([[(7 * i + 3) % 256 for i in range(80)]])  # past Gemma's sliding window
    with torch.no_grad():
        before = model(input_ids=ids).logits
    summary = pad_uniform(model)
    assert summary["layers"] == [1, 2, 3] and len(set(layer_widths(model))) == 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
