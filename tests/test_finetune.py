"""Recovery fine-tuning on the tiny model: the loop, LoRA (float, packed, LoftQ), PEQA, the format
and the stage through the runner. One CPU thread everywhere: on a busy 2-core machine two threads
make these tiny steps dozens of times slower."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pqflow.data import eval_windows, load_text, tokenize
from pqflow.methods.tuning import REGISTRY, lora, peqa
from pqflow.methods.tuning.common import ADAPTER_DIR, Base
from pqflow.methods.tuning.train import TrainData, lr_factor
from pqflow.models import load_model_artifact, weight_bytes
from pqflow.quant import QuantLinear
from pqflow.recipe import parse_recipe
from pqflow.runner import run_stage

FAST = {"steps": 12, "batch_size": 2, "seqlen": 32, "eval_every": 6, "eval_windows": 4, "threads": 1,
        "warmup_steps": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small local text (the start of WikiText-2 valid): 90% train, 10% held out."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(load_text("wikitext2", "heldout")[:24000])
    return path


@pytest.fixture
def data(tiny, corpus: Path) -> TrainData:
    _, tok = tiny
    src = f"text:{corpus}"
    return TrainData(tokenize(tok, load_text(src, "train")),
                     eval_windows(tokenize(tok, load_text(src, "heldout")), 32, 4))


def _recipe(root: Path, corpus: Path, finetune: dict | None = None) -> object:
    stages: dict = {"quantize": {"enabled": True, "method": "rtn", "bits": 4, "group_size": 64},
                    "evaluate": {"seqlen": 32, "max_windows": 4}}
    if finetune:
        stages["finetune"] = {"enabled": True, "data": {"source": f"text:{corpus}"}, **finetune}
    return parse_recipe({"name": "ft", "model": {"source": "tiny-llama"}, "stages": stages,
                         "storage": {"root": f"file://{root}"}})


@pytest.fixture
def packed(tmp_path: Path, corpus: Path) -> Path:
    """A pqflow-quant artifact of the tiny model (RTN 4-bit, groups of 64) made by the quantize stage."""
    out = tmp_path / "q"
    run_stage("quantize", _recipe(tmp_path, corpus), {}, str(out))
    return out


def _base(folder: Path) -> Base:
    loaded = load_model_artifact(folder)
    return Base(loaded.model, loaded.tokenizer, json.loads((folder / "pqflow_model.json").read_text()), folder)


def test_lr_schedule_warmup_cosine_and_time_budget():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    # half the wall-clock budget spent at step 20: the schedule is already half-way down
    assert lr_factor(20, 100, 10, 0.0, time_frac=0.5) == pytest.approx(0.5)


def test_loss_goes_down(tiny, data, tmp_path: Path):
    model, tok = tiny
    p = lora.Params(**{**FAST, "steps": 20, "lr": 3e-3, "merge": False})
    tuned = lora.tune(Base(model, tok, {"format": "hf"}), data, p, tmp_path / "out")
    h = tuned.history
    first = sum(s["loss"] for s in h.steps[:4]) / 4
    last = sum(s["loss"] for s in h.steps[-4:]) / 4
    assert last < first - 0.1
    assert h.best_ppl < h.initial_ppl and h.best_step > 0
    assert tuned.trainable_params == sum(t.numel() for n, t in tuned.model.named_parameters() if "lora_" in n)


def test_peqa_changes_only_scales(packed: Path, data, tmp_path: Path):
    out = tmp_path / "peqa"
    tuned = peqa.tune(_base(packed), data, peqa.Params(**{**FAST, "lr": 1e-3}), out)
    before, after = load_file(str(packed / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    for k in before:
        assert before[k].dtype == after[k].dtype
        if k.endswith((".qweight", ".zeros")):
            assert before[k].numpy().tobytes() == after[k].numpy().tobytes()
    assert weight_bytes(out) == weight_bytes(packed)
    assert tuned.trainable_params == sum(m.scales.numel() for m in tuned.model.modules() if isinstance(m, QuantLinear))
    assert tuned.history.best_ppl < tuned.history.initial_ppl
    w = data.heldout[:1]
    with torch.no_grad():
        assert torch.equal(load_model_artifact(out).model(w).logits, tuned.model(w).logits)


def test_peqa_needs_a_packed_model(tiny, data, tmp_path: Path):
    model, tok = tiny
    with pytest.raises(ValueError, match="pqflow-quant"):
        peqa.tune(Base(model, tok, {"format": "hf"}), data, peqa.Params(**FAST), tmp_path / "x")


_RELOAD = """
import sys, torch
from pqflow.models import load_model_artifact
loaded = load_model_artifact(sys.argv[1])
w = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(loaded.model(input_ids=w, use_cache=False).logits, sys.argv[3])
"""


def _fresh_process_logits(folder: Path, window: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(window, tmp_path / "w.pt")
    subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(tmp_path / "w.pt"), str(tmp_path / "l.pt")],
                   check=True, capture_output=True)
    return torch.load(tmp_path / "l.pt", weights_only=True)


def test_lora_on_packed_base_saved_in_peft_format_reloads_in_fresh_process(packed: Path, data, tmp_path: Path):
    out = tmp_path / "lora"
    tuned = lora.tune(_base(packed), data, lora.Params(**{**FAST, "lr": 3e-3}), out)
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    meta = json.loads((out / "pqflow_model.json").read_text())
    assert meta["format"] == "pqflow-lora" and not meta["merged"] and meta["base"]["format"] == "pqflow-quant"
    # the frozen packed base is kept byte for byte
    assert (out / "model.safetensors").read_bytes() == (packed / "model.safetensors").read_bytes()
    adapter = load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())
    w = data.heldout[:2]
    with torch.no_grad():
        ref = tuned.model(input_ids=w, use_cache=False).logits
    assert torch.equal(_fresh_process_logits(out, w, tmp_path), ref)


def test_lora_on_float_base_merges(tiny, data, tmp_path: Path):
    model, tok = tiny
    out = tmp_path / "merged"
    tuned = lora.tune(Base(model, tok, {"format": "hf"}), data, lora.Params(**{**FAST, "lr": 3e-3}), out)
    meta = json.loads((out / "pqflow_model.json").read_text())
    assert meta["merged"] and meta["base"]["format"] == "hf"
    assert not any("lora_" in n for n, _ in tuned.model.named_parameters())
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    w = data.heldout[:1]
    with torch.no_grad():
        torch.testing.assert_close(load_model_artifact(out).model(w).logits, tuned.model(w).logits, rtol=0, atol=1e-6)


def test_bf16_merged_lora_computes_as_it_reloads(data, tmp_path: Path):
    # A bf16 cast must keep RoPE's inverse frequencies in fp32, as from_pretrained(dtype=bf16)
    # does; otherwise the tuned model and its reloaded artifact disagree by whole logits.
    from pqflow.tiny import tiny_llama

    model, tok = tiny_llama()
    p = lora.Params(**{**FAST, "steps": 2, "lr": 3e-3, "base_dtype": "bfloat16"})
    tuned = lora.tune(Base(model, tok, {"format": "hf"}), data, p, tmp_path / "bf16")
    assert next(tuned.model.parameters()).dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in tuned.model.named_buffers() if n.endswith("inv_freq"))
    w = data.heldout[:1]
    with torch.no_grad():
        assert torch.equal(load_model_artifact(tmp_path / "bf16").model(w).logits, tuned.model(w).logits)


def test_loftq_starts_closer_to_the_float_model_than_rtn(tiny, data, packed: Path, tmp_path: Path):
    model, tok = tiny
    w = data.heldout
    with torch.no_grad():
        ref = model(input_ids=w).logits
    p = lora.Params(**{**FAST, "steps": 1, "lr": 1e-12, "init": "loftq", "loftq_iter": 2, "keep_best": False})
    tuned = lora.tune(Base(model, tok, {"format": "hf"}), data, p, tmp_path / "loftq")
    assert tuned.info["loftq_rel_err"] < tuned.info["loftq_rtn_rel_err"]
    with torch.no_grad():
        loftq_err = (tuned.model(input_ids=w).logits - ref).pow(2).mean()
        rtn_err = (load_model_artifact(packed).model(input_ids=w).logits - ref).pow(2).mean()
    assert loftq_err < rtn_err
    # the base it writes is a real packed model of the same size as the RTN one
    assert weight_bytes(tmp_path / "loftq") - weight_bytes(tmp_path / "loftq" / ADAPTER_DIR) == weight_bytes(packed)


def test_lora_params_are_validated(tmp_path: Path, corpus: Path):
    from pqflow.errors import RecipeError

    assert REGISTRY.names() == ["lora", "peqa"]
    with pytest.raises(RecipeError, match="stages.finetune.params.rank"):
        _recipe(tmp_path, corpus, {"method": "lora", "params": {"rank": 4}})
    with pytest.raises(RecipeError, match="stages.finetune.params.init"):
        _recipe(tmp_path, corpus, {"method": "lora", "params": {"init": "pissa"}})


def test_stage_through_the_runner(packed: Path, tmp_path: Path, corpus: Path):
    r = _recipe(tmp_path, corpus, {"method": "peqa", "params": {**FAST, "lr": 1e-3}})
    out = tmp_path / "ft"
    res = run_stage("finetune", r, {"model": str(packed)}, str(out))
    s = res.summary
    assert s["trainable_params"] > 0 and s["steps"] == FAST["steps"]
    assert s["val_ppl_best"] <= s["val_ppl_before"] and s["reload_max_abs_logit_diff"] == 0
    assert s["model_bytes"] == s["input_bytes"]
    curve = json.loads((out / "loss_curve.json").read_text())
    assert len(curve["steps"]) == FAST["steps"] and curve["evals"][0]["step"] == 0
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "train_metrics.json").is_file()
    again = run_stage("finetune", r, {"model": str(packed)}, str(out))
    assert again.skipped
    ev = run_stage("evaluate", r, {"model": str(out)}, str(tmp_path / "ev"))
    assert ev.summary["ppl"] > 0
