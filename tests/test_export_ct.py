"""compressed-tensors (pack-quantized) export: bit-exact against pqflow's dequantized weights through
the library's own decompression, the config it writes, the errors, and ppl in a clean venv holding
only torch, transformers and compressed-tensors (tests/ct_score.py, no pqflow import)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pqflow.data import eval_windows, load_text, tokenize
from pqflow.export import ExportError, ExportOptions
from pqflow.export import compressed_tensors as ct
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import LinearSpec, resolve_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.perplexity import perplexity
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import FORMAT, quantize_embeddings, save_quantized

from .test_export import BLOCKS, linear_name

pytest.importorskip("compressed_tensors")

SCORE = Path(__file__).with_name("ct_score.py")

# Every bit width and group kind pqflow stores, asymmetric and symmetric, in one model.
MIXED = {
    linear_name(0, "q"): LinearSpec(3, 32, True),
    linear_name(0, "k"): LinearSpec(2, 64, True),
    linear_name(0, "up"): LinearSpec(2, None, False),
    linear_name(1, "gate"): LinearSpec(3, 64, False),
    linear_name(1, "o"): LinearSpec(8, 128, True),
    linear_name(2, "down"): LinearSpec(8, None, False),
    linear_name(3, "down"): LinearSpec(4, None, True),
}


def _artifact(tiny, path: Path, bits: int = 4, group: int | None = 64, sym: bool = False,
              extra: dict | None = None, embed_bits: int | None = None) -> Path:
    model, tok = tiny
    plan = resolve_plan(model, bits, group, sym)
    plan.update(extra or {})
    rtn.quantize(model, None, plan, rtn.Params())
    if embed_bits:
        quantize_embeddings(model, embed_bits, None, 64, False)
    return save_model(model, tok, path, fmt=FORMAT, saver=save_quantized)


def _export(src: Path, out: Path, **opts) -> dict:
    out.mkdir(parents=True)
    return ct.export(src, out, ExportOptions(**opts))


def _decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Every packed module's weight as compressed-tensors itself decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(folder / ct.WEIGHTS))
    out = {}
    for scheme in qcfg.config_groups.values():
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
            out[name] = comp.decompress(local, scheme)["weight"]
    return out


def _packed(src: Path) -> dict[str, QuantLinear]:
    model = load_model_artifact(src).model
    return {n: m for n, m in model.named_modules() if type(m) is QuantLinear}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_library_decompression_equals_pqflow_bit_for_bit(tiny, tmp_path, dtype):
    src = _artifact(tiny, tmp_path / "q", extra=MIXED)
    summary = _export(src, tmp_path / "ct", dtype=dtype)
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["version"] == ct.CT_VERSION == summary["compressed_tensors"]
    assert qcfg["format"] == "pack-quantized" and qcfg["ignore"] == ["lm_head"]
    assert summary["config_groups"] == len(qcfg["config_groups"]) == 8  # the 7 above + 4g64 asym
    assert summary["schemes"]["w4g64a"] == 28 - len(MIXED) and summary["schemes"]["w2pca"] == 1
    by_bits = {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qcfg["config_groups"].values()}
    assert {(2, "channel"), (3, "group"), (4, "group"), (8, "channel"), (8, "group")} <= by_bits
    tensors = load_file(str(tmp_path / "ct" / ct.WEIGHTS))
    gate1, q0 = linear_name(1, "gate"), linear_name(0, "q")
    assert tensors[f"{gate1}.weight_packed"].dtype == torch.int32
    assert tensors[f"{gate1}.weight_zero_point"].shape == (384 * 3 // 32, 2)  # packed on dim 0
    assert f"{q0}.weight_zero_point" not in tensors  # symmetric: none stored
    ours = _packed(src)
    theirs = _decompressed(tmp_path / "ct")
    assert set(theirs) == set(ours)
    for name, q in ours.items():
        # the library dequantizes in the stored scales' dtype, as pqflow does in its compute dtype
        assert torch.equal(theirs[name], q.dequantize(theirs[name].dtype)), name
    assert theirs[linear_name(0, "q")].dtype == getattr(torch, dtype)


def test_ragged_last_group_fails_naming_the_layer_or_widens_exactly(tiny, tmp_path):
    ragged = linear_name(1, "down")  # in 384, groups of 256: the last group has 128 columns
    src = _artifact(tiny, tmp_path / "q", extra={ragged: LinearSpec(4, 256, False)})
    with pytest.raises(ExportError, match=rf"^{ragged}: in_features 384 is not a multiple of group_size 256"):
        _export(src, tmp_path / "ct", dtype="float32")
    assert not list((tmp_path / "ct").iterdir())  # nothing written before the check
    summary = _export(src, tmp_path / "wide", fallback="widen", dtype="float32")
    assert summary["schemes"]["w4g128a"] == 1
    assert torch.equal(_decompressed(tmp_path / "wide")[ragged], _packed(src)[ragged].dequantize())


def _prune_mlp(model, widths: list[int]) -> None:
    """Keep the first ``w`` MLP channels of each layer (the adapter's surgery)."""
    from pqflow import architectures as arch
    from pqflow.methods.prune.surgery import SHAPES_KEY

    for layer, w in zip(arch.decoder_layers(model), widths, strict=True):
        arch.cut_channels(layer, list(range(w)))
    setattr(model.config, SHAPES_KEY, [[4, 2, w] for w in widths])


def test_uneven_pruned_widths_fail_and_uniform_ones_go_into_the_config(tiny, tmp_path):
    model, tok = tiny
    _prune_mlp(model, [384, 256, 384, 384])
    src = _artifact((model, tok), tmp_path / "uneven")
    with pytest.raises(ExportError, match=rf"^{re.escape(BLOCKS)}\.1 has another width.*--uneven pad"):
        _export(src, tmp_path / "ct")
    from pqflow.tiny import tiny_llama

    model, tok = tiny_llama(seed=0)
    _prune_mlp(model, [256] * 4)
    src = _artifact((model, tok), tmp_path / "uniform")
    _export(src, tmp_path / "ct2", dtype="float32")
    cfg = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert cfg["intermediate_size"] == 256 and "pqflow_layer_shapes" not in cfg
    ours, theirs = _packed(src), _decompressed(tmp_path / "ct2")
    assert all(torch.equal(theirs[n], q.dequantize()) for n, q in ours.items())


def test_quantized_tied_embedding_is_written_dequantized(tiny, tmp_path):
    src = _artifact(tiny, tmp_path / "q", embed_bits=4)
    summary = _export(src, tmp_path / "ct", dtype="float32")
    assert summary["float_fallbacks"] == ["model.embed_tokens", "lm_head (tied)"]
    tensors = load_file(str(tmp_path / "ct" / ct.WEIGHTS))
    emb = load_model_artifact(src).model.get_input_embeddings()
    assert torch.equal(tensors["model.embed_tokens.weight"], emb.dequantize(torch.float32))
    assert "lm_head.weight" not in tensors  # tied on load


def test_another_compressed_tensors_version_is_refused(monkeypatch, tmp_path):
    import compressed_tensors

    monkeypatch.setattr(compressed_tensors, "__version__", "0.17.1")
    with pytest.raises(ExportError, match=r"pinned to compressed-tensors==0\.20\.1.*3-bit"):
        ct.export(tmp_path, tmp_path / "o", ExportOptions())


# -- the real engine -------------------------------------------------------------------------------

def _clean_venv() -> Path:
    """The clean venv (tests/ct_venv.py); skipped with pip's reason where PyPI is unreachable."""
    from .ct_venv import clean_venv

    try:
        return clean_venv(ct.CT_VERSION)
    except RuntimeError as e:
        pytest.skip(str(e))


ENGINE_CASES = {
    "rtn-4g64": dict(bits=4, group=64),
    "rtn-8pc": dict(bits=8, group=None),
    "rtn-3g64": dict(bits=3, group=64),
    "mixed-2348": dict(bits=4, group=64, extra=MIXED),
}


def test_exports_score_pqflow_ppl_in_clean_transformers_venv(tmp_path):
    from pqflow.tiny import tiny_llama

    py = _clean_venv()
    windows = None
    ours, exports = {}, {}
    for name, kw in ENGINE_CASES.items():
        src = _artifact(tiny_llama(seed=0), tmp_path / name, **kw)
        exports[name] = str(tmp_path / f"{name}-ct")
        _export(src, Path(exports[name]), dtype="float32")
        loaded = load_model_artifact(src)
        if windows is None:
            windows = eval_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test")), 128, 8)
        ours[name] = perplexity(loaded.model, windows, progress=False).ppl
    (tmp_path / "ids.json").write_text(json.dumps(windows.tolist()))
    (tmp_path / "job.json").write_text(json.dumps({"ids": str(tmp_path / "ids.json"), "exports": exports}))
    res = subprocess.run([str(py), str(SCORE), str(tmp_path / "job.json")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs.pop("_versions")["compressed_tensors"] == ct.CT_VERSION
    print(json.dumps({n: {"pqflow": ours[n], **theirs[n]} for n in ours}, indent=1))
    for name in ENGINE_CASES:
        assert abs(theirs[name]["ppl"] - ours[name]) / ours[name] < 1e-3, (name, theirs[name], ours[name])
    # one config group (with or without zero points): transformers' own from_pretrained reads it
    assert all(theirs[n]["loader"] == "from_pretrained" for n in ("rtn-4g64", "rtn-8pc", "rtn-3g64"))


def test_padded_uneven_export_scores_pqflow_ppl_in_clean_transformers_venv(tiny, tmp_path):
    from pqflow.methods.prune.plan import PrunePlan
    from pqflow.methods.prune.surgery import apply_plan

    from .test_export_pad import SCHEMES, UNEVEN

    py = _clean_venv()
    model, tok = tiny
    apply_plan(model, PrunePlan(keep=UNEVEN))
    src = _artifact((model, tok), tmp_path / "uneven", bits=4, group=32, extra=SCHEMES)
    summary = _export(src, tmp_path / "ct", dtype="float32", uneven="pad")
    assert summary["padded"]["layers"] == [1, 2, 3]
    loaded = load_model_artifact(src)
    windows = eval_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test")), 128, 4)
    ours = perplexity(loaded.model, windows, progress=False).ppl
    (tmp_path / "ids.json").write_text(json.dumps(windows.tolist()))
    job = {"ids": str(tmp_path / "ids.json"), "exports": {"padded": str(tmp_path / "ct")}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    res = subprocess.run([str(py), str(SCORE), str(tmp_path / "job.json")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])["padded"]
    assert abs(theirs["ppl"] - ours) / ours < 1e-3, (theirs, ours)


def test_readme_loader_reads_a_mixed_export_in_the_clean_venv(tiny, tmp_path):
    """The README's transformers snippet for mixed-scheme exports (what `from_pretrained` cannot
    load yet) runs as printed, without pqflow, and computes pqflow's logits."""
    import re

    py = _clean_venv()
    src = _artifact(tiny, tmp_path / "mixed", bits=4, group=64, extra=MIXED)
    _export(src, tmp_path / "ct", dtype="float32")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"let compressed-tensors decompress.*?```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace('"pqflow-artifacts/smollm2-demo/export/compressed-tensors"', repr(str(tmp_path / "ct")))
    ids = [[1, 5, 9, 30, 70, 120, 7, 3]]
    snippet += (f"\nwith torch.no_grad():\n    print('LOGITS', json.dumps(model(torch.tensor({ids})).logits[0].tolist()))\n"
                "import sys\nassert not any(m.startswith('pqflow') for m in sys.modules)\n")
    res = subprocess.run([str(py), "-c", snippet], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = torch.tensor(json.loads(res.stdout.split("LOGITS ", 1)[1].splitlines()[0]))
    with torch.no_grad():
        ours = load_model_artifact(src).model(torch.tensor(ids)).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
