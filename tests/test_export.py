"""`pqflow export`: the registry, the CLI, verified export artifacts, and hf-dense read by plain
transformers in a process that never imports pqflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqflow import architectures as arch
from pqflow.artifacts import MANIFEST, build_manifest, open_artifact, publish, staging_dir
from pqflow.cli import main
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import LinearSpec, resolve_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.perplexity import perplexity
from pqflow.quant.model import FORMAT, quantize_embeddings, save_quantized

# The tiny Llama's names, as the architecture adapter places its blocks and roles
LLAMA = arch.FAMILIES["llama"]
BLOCKS = arch.config_layers_prefix(LLAMA)  # the module-name prefix of the decoder blocks


def linear_name(block: int, role: str) -> str:
    """The tiny Llama's module name of ``role``'s linear (q, k, v, o, gate, up, down) in ``block``."""
    return f"{BLOCKS}.{block}.{getattr(LLAMA, role)}"


# Scores an exported folder with plain transformers; fails if anything imports pqflow.
SCORE = r"""
import json, math, sys
import torch
from transformers import AutoModelForCausalLM
folder, ids_path = sys.argv[1:3]
windows = torch.tensor(json.load(open(ids_path)))
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=windows).logits.float()
nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
assert not any(m == "pqflow" or m.startswith("pqflow.") for m in sys.modules), "pqflow was imported"
print(json.dumps({"ppl": math.exp(nll.item()), "logit_sum": logits.double().sum().item()}))
"""


def _publish_model(model, tok, uri: Path, **save_kw) -> str:
    work = staging_dir(str(uri))
    save_model(model, tok, work, **save_kw)
    publish(work, str(uri), build_manifest(work, stage="quantize", params={}, inputs={}, fingerprint="t"))
    return str(uri)


def _quantized(tiny, tmp_path: Path, mixed: bool = True, embed_bits: int | None = None) -> str:
    model, tok = tiny
    plan = resolve_plan(model, 4, 64, False)
    if mixed:
        plan[linear_name(0, "q")] = LinearSpec(3, 32, True)
        plan[linear_name(0, "up")] = LinearSpec(2, None, False)
        plan[linear_name(2, "down")] = LinearSpec(8, None, False)
    rtn.quantize(model, None, plan, rtn.Params())
    if embed_bits:
        quantize_embeddings(model, embed_bits, None, 64, False)
    return _publish_model(model, tok, tmp_path / "quant", fmt=FORMAT, saver=save_quantized)


def _windows(tok) -> torch.Tensor:
    return eval_windows(tokenize(tok, load_text("wikitext2", "test")), 64, 4)


def _score_outside(folder: Path, windows: torch.Tensor, tmp_path: Path) -> dict:
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(windows.tolist()))
    out = subprocess.run([sys.executable, "-c", SCORE, str(folder), str(ids)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("embed_bits", [None, 4])
def test_hf_dense_loads_in_plain_transformers_with_pqflow_ppl(tiny, tmp_path, embed_bits):
    src = _quantized(tiny, tmp_path, embed_bits=embed_bits)
    out = tmp_path / "dense"
    assert main(["export", src, "--format", "hf-dense", "--out", str(out), "--dtype", "float32"]) == 0
    art = open_artifact(str(out))
    assert art.manifest["stage"] == "export" and art.manifest["summary"]["format"] == "hf-dense"
    assert art.manifest["inputs"]["model"]["digest"] == open_artifact(src).digest
    assert not list(out.glob("*.bin")) and "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = load_model_artifact(Path(src))
    windows = _windows(loaded.tokenizer)
    ours = perplexity(loaded.model, windows, progress=False).ppl
    theirs = _score_outside(out, windows, tmp_path)["ppl"]
    assert abs(theirs - ours) / ours < 1e-4, (theirs, ours)


def test_hf_dense_fp16_is_within_fp16_rounding(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, mixed=False)
    out = tmp_path / "dense16"
    assert main(["export", src, "--format", "hf-dense", "--out", str(out)]) == 0
    loaded = load_model_artifact(Path(src))
    windows = _windows(loaded.tokenizer)
    ours = perplexity(loaded.model, windows, progress=False).ppl
    theirs = _score_outside(out, windows, tmp_path)["ppl"]
    assert abs(theirs - ours) / ours < 1e-3, (theirs, ours)
    # fp16 weights: about half the bytes of the float32 export of the same model
    assert open_artifact(str(out)).manifest["summary"]["dtype"] == "float16"


def test_export_is_skipped_when_up_to_date_and_refuses_bad_targets(tiny, tmp_path, capsys):
    src = _quantized(tiny, tmp_path, mixed=False)
    out = tmp_path / "dense"
    assert main(["export", src, "--format", "hf-dense", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["export", src, "--format", "hf-dense", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True and first["skipped"] is False
    assert main(["export", src, "--format", "hf-dense", "--out", src]) == 2
    assert "overlaps input 'model'" in capsys.readouterr().err
    cal = tmp_path / "notamodel"
    work = staging_dir(str(cal))
    (work / "x.json").write_text("{}")
    publish(work, str(cal), build_manifest(work, stage="calibrate", params={}, inputs={}, fingerprint="c"))
    assert main(["export", str(cal), "--format", "hf-dense", "--out", str(tmp_path / "o2")]) == 2
    assert "not a model artifact" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_uneven_pruned_widths_fail_naming_the_layer_and_write_nothing(tiny, tmp_path, capsys):
    from pqflow.methods.prune.format import FORMAT as PRUNED
    from pqflow.methods.prune.surgery import SHAPES_KEY

    model, tok = tiny
    arch.cut_channels(arch.decoder_layers(model)[1], list(range(200)))
    setattr(model.config, SHAPES_KEY, [[4, 2, 384], [4, 2, 200], [4, 2, 384], [4, 2, 384]])
    src = _publish_model(model, tok, tmp_path / "pruned", fmt=PRUNED)
    out = tmp_path / "dense"
    capsys.readouterr()
    assert main(["export", src, "--format", "hf-dense", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{BLOCKS}.1" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".dense.partial-*"))


def test_unknown_format_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert MANIFEST == "manifest.json"


def test_compressed_tensors_through_the_cli_is_a_verified_artifact(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, mixed=False)
    out = tmp_path / "ct"
    assert main(["export", src, "--format", "compressed-tensors", "--out", str(out)]) == 0
    art = open_artifact(str(out))
    summary = art.manifest["summary"]
    assert summary["format"] == "compressed-tensors" and summary["compressed_tensors"] == "0.20.1"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["version"] == "0.20.1"
    assert art.manifest["bytes"] < open_artifact(src).manifest["bytes"] * 1.5


def test_lora_adapters_are_folded_into_the_dense_export(tiny, tmp_path):
    from .test_formats import _lora

    model = _lora(tiny, tmp_path / "lora")
    src = tmp_path / "lora-art"
    work = staging_dir(str(src))
    for f in (tmp_path / "lora").rglob("*"):
        if f.is_file():
            dest = work / f.relative_to(tmp_path / "lora")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    publish(work, str(src), build_manifest(work, stage="finetune", params={}, inputs={}, fingerprint="t"))
    out = tmp_path / "dense"
    main(["export", str(src), "--format", "hf-dense", "--out", str(out), "--dtype", "float32"])
    windows = _windows(tiny[1])
    theirs = _score_outside(out, windows, tmp_path)
    with torch.no_grad():
        ours = perplexity(model, windows, progress=False).ppl
    assert abs(theirs["ppl"] - ours) / ours < 1e-4, (theirs, ours)


# -- families -------------------------------------------------------------------------------------

# Families whose blocks the exporters write (standard transformers folders: the config is the
# model's own), and those the architecture adapter refuses for export.
EXPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
REFUSED = ["phi3", "olmo2", "granite", "qwen3_moe"]
# 80 tokens: past Gemma's sliding window (32), so sliding and global layers both matter
FAMILY_IDS = [[(7 * i + 3) % 256 for i in range(80)]]

# Loads each exported folder with plain transformers and prints its logits; fails if anything
# imports pqflow.
LOGITS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
job = json.load(open(sys.argv[1]))
ids = torch.tensor(job["ids"])
out = {}
for key, folder in job["exports"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out[key] = model(input_ids=ids).logits[0].tolist()
assert not any(m == "pqflow" or m.startswith("pqflow.") for m in sys.modules), "pqflow was imported"
print(json.dumps(out))
"""


def test_families_export_to_folders_plain_transformers_computes_like_pqflow(tmp_path):
    """Every family the exporters write: 4-bit RTN, exported as hf-dense (fp16) and compressed-
    tensors (fp32), reloaded by plain transformers: pqflow's logits, within fp16 rounding for the
    fp16 copy and exactly for the packed one (its scales are fp16, its codes the same)."""
    from pqflow.architectures import prepare
    from pqflow.export import ExportOptions, export_artifact
    from pqflow.tiny import tiny_model

    ids = torch.tensor(FAMILY_IDS)
    ours, exports = {}, {}
    for family in EXPORTED:
        model, tok = tiny_model(family)
        prepare(model)
        rtn.quantize(model, None, resolve_plan(model, 4, 64, False), rtn.Params())
        src = _publish_model(model, tok, tmp_path / family, fmt=FORMAT, saver=save_quantized)
        for fmt, dtype in (("hf-dense", "float16"), ("compressed-tensors", "float32")):
            out = tmp_path / f"{family}-{fmt}"
            summary = export_artifact(src, fmt, str(out), ExportOptions(dtype=dtype))
            assert summary["format"] == fmt
            assert json.loads((out / "config.json").read_text())["model_type"] == model.config.model_type
            exports[f"{family}/{fmt}"] = str(out)
        with torch.no_grad():
            ours[family] = load_model_artifact(Path(src)).model(input_ids=ids).logits[0]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"ids": FAMILY_IDS, "exports": exports}))
    run = subprocess.run([sys.executable, "-c", LOGITS, str(job)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for key, logits in theirs.items():
        family, fmt = key.split("/")
        ref = ours[family]
        # fp16 weights: measured below 2.5e-3 of the logits' spread on these models
        atol = 0.01 * ref.std().item() if fmt == "hf-dense" else 1e-5
        torch.testing.assert_close(torch.tensor(logits), ref, rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("family", REFUSED)
def test_families_the_exporters_do_not_write_fail_in_one_line_before_writing(family, tmp_path, capsys):
    from pqflow.tiny import tiny_model

    model, tok = tiny_model(family)  # the family is read off the artifact's config before anything loads
    src = _publish_model(model, tok, tmp_path / "model")
    capsys.readouterr()
    for fmt in ("hf-dense", "compressed-tensors", "gguf"):
        assert main(["export", src, "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"export is not supported for {family}: " in err[0], err
        assert not (tmp_path / fmt).exists() and not list(tmp_path.glob(f".{fmt}.partial-*"))
