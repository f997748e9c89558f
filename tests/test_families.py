"""The family matrix: every supported decoder family through the whole pipeline on its tiny random
model, built in code (no download).

Per family, two runs on one artifact root (the second reuses calibrate, importance, prune and
bit-search): calibrate -> Taylor importance -> width pruning with reformation -> importance-prior
bit search -> gptq | mrem -> peqa | lora -> evaluate. The pruned and the quantized artifacts are
reloaded in a fresh process and must give the very logits the pipeline's process computed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pqflow.architectures import CHANNEL_PRUNING, FAMILIES, HEAD_PRUNING, refusal
from pqflow.recipe import parse_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
VARIANTS = {"gptq-peqa": ("gptq", "peqa"), "mrem-lora": ("mrem", "lora")}


def width_params(family: str) -> dict:
    """Width pruning as far as the family allows: heads and MLP channels, or only one of them."""
    heads = refusal(FAMILIES[family], HEAD_PRUNING) is None
    channels = refusal(FAMILIES[family], CHANNEL_PRUNING) is None
    return {"correction": "reformation", "correct_windows": 8, "round_to": 32, "min_channels": 64,
            "head_mode": "query" if heads else "none", **({} if channels else {"channels": False})}


def family_recipe(family: str, quant: str, tune: str) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["name"] = f"fam-{family}"
    data["model"] = {"source": f"tiny-{family}"}
    st = data["stages"]
    st["importance"] = {"enabled": True, "method": "taylor", "params": {"n_windows": 4}}
    st["prune"] = {"enabled": True, "method": "width", "ratio": 0.2, "params": width_params(family)}
    st["bit_search"] = {"enabled": True, "method": "importance-prior", "avg_bits": 4.5,
                        "choices": ["3g32", "4g32", "8g32"], "heldout_windows": 2, "heldout_seqlen": 64}
    # gptq without its clip search: the matrix checks that every family runs, the bench measures quality
    qparams = {"steps": 2, "n_windows": 4} if quant == "mrem" else {"clip_search": False, "n_windows": 4}
    st["quantize"] = {"enabled": True, "method": quant, "bits": 4, "group_size": 32, "params": qparams}
    st["finetune"] = {"enabled": True, "method": tune,
                      "params": {"steps": 2, "seqlen": 64, "batch_size": 2, "warmup_steps": 0, "eval_every": 2,
                                 "eval_windows": 2}}
    return data


def _logits_in_fresh_process(folder: str, ids: torch.Tensor, out: Path) -> torch.Tensor:
    torch.save(ids, out.with_suffix(".ids"))
    code = ("import sys, torch\n"
            "from pqflow.models import load_model_artifact\n"
            "m = load_model_artifact(sys.argv[1]).model\n"
            "with torch.no_grad():\n"
            "    torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n")
    res = subprocess.run([sys.executable, "-c", code, folder, str(out.with_suffix(".ids")), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(out)


def _local(uri: str) -> str:
    return uri.removeprefix("file://")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_runs_the_whole_pipeline(family, tmp_path):
    from pqflow.family_support import check_family_support
    from pqflow.local_run import run_plan
    from pqflow.models import load_model_artifact

    root = f"file://{tmp_path / 'art'}"
    recipe = parse_recipe(family_recipe(family, "gptq", "peqa"))
    assert check_family_support(recipe).name == family
    first = run_plan(recipe, root)
    assert first.outcomes["prune"].manifest["summary"]["ratio_removed"] > 0.05  # tensors got smaller (MoE: heads only)
    quant = json.loads((Path(_local(first.outcomes["quantize"].uri)) / "quant_config.json").read_text())
    assert quant["modules"], "nothing was quantized"

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    for stage in ("prune", "quantize"):
        folder = _local(first.outcomes[stage].uri)
        with torch.no_grad():
            here = load_model_artifact(Path(folder)).model(input_ids=ids).logits
        there = _logits_in_fresh_process(folder, ids, tmp_path / f"{stage}.pt")
        assert torch.equal(here, there), f"{family} {stage}: reload differs by {(here - there).abs().max()}"

    # the other quantizer and tuner on the same pruned model: everything upstream is reused
    second = run_plan(parse_recipe(family_recipe(family, "mrem", "lora")), root)
    for stage in ("calibrate", "importance", "prune", "bit-search"):
        assert second.outcomes[stage].skipped, stage
    for res in (first, second):
        ppl = res.outcomes["evaluate"].manifest["summary"]["ppl"]
        assert math.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize(("family", "stage", "change", "words"), [
    ("phi3", "prune", {"params": {"head_mode": "query"}}, ["phi3", "head pruning", "width"]),
    ("olmo2", "prune", {"params": {"head_mode": "group"}}, ["olmo2", "head pruning", "width"]),
    ("qwen3_moe", "prune", {"params": {"head_mode": "none"}}, ["qwen3_moe", "MLP channel pruning", "width"]),
    ("gemma2", "export", {"formats": ["gguf"]}, ["gemma2", "gguf"]),
    ("granite", "export", {"formats": ["compressed-tensors"]}, ["granite", "export"]),
])
def test_validate_refuses_what_a_family_cannot_take(family, stage, change, words, tmp_path):
    """One line naming the family and the method, exit 2, before any model loads."""
    data = yaml.safe_load(TINY.read_text())
    data["model"] = {"source": f"tiny-{family}"}
    if stage == "prune":
        data["stages"]["prune"] = {"enabled": True, "method": "width", **change}
        data["stages"]["importance"] = {"enabled": True, "method": "taylor"}
    else:
        data["stages"]["quantize"] = {"enabled": True, "method": "rtn"}
        data["stages"]["export"] = change
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    res = subprocess.run([str(Path(sys.executable).parent / "pqflow"), "validate", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert "model tiny-" not in err  # nothing was loaded


def test_validate_names_the_family_of_a_local_folder(tmp_path):
    from pqflow.family_support import source_family
    from pqflow.tiny import tiny_model

    model, tok = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "m")
    assert source_family(f"hf:{tmp_path / 'm'}").name == "qwen3"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "mamba"}')
    from pqflow.architectures import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="model type 'mamba' has no pqflow architecture adapter"):
        source_family(f"hf:{tmp_path / 'other'}")
