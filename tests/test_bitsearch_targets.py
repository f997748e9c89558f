"""``stages.bit_search.target``: a search for an engine only picks schemes the engine runs, ties the
linears it fuses, and the allocation it returns exports to the engine's format with no fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqflow import architectures as arch
from pqflow.errors import RecipeError
from pqflow.export import ExportOptions, export_artifact
from pqflow.methods.bitsearch.space import SearchSpace, parse_choice
from pqflow.methods.bitsearch.targets import TARGETS
from pqflow.recipe import parse_recipe
from pqflow.runner import run_stage

CHOICES = ["2g64", "3g64", "4g32", "4g64", "4g128", "8pc", "8g64", "4g48"]


def _labels(target: str, symmetric: bool) -> tuple[list[str], dict[str, str]]:
    allowed, refused = TARGETS[target].allowed([parse_choice(c) for c in CHOICES], symmetric)
    return [c.label for c in allowed], refused


def test_each_target_keeps_what_its_kernels_take():
    assert _labels("any", False)[0] == CHOICES
    vllm, why = _labels("vllm", False)
    assert vllm == ["4g32", "4g64", "4g128", "8pc", "8g64"]
    assert "4 and 8 bits" in why["3g64"] and "32, 64 or 128" in why["4g48"]
    cpp, why = _labels("llama.cpp", False)
    assert cpp == ["4g32", "4g64", "4g128"]  # 8-bit with zero points has no exact GGUF type
    assert "Q8_0" in why["8pc"] and "multiple of 32" in why["4g48"]
    assert _labels("llama.cpp", True)[0] == ["4g32", "4g64", "4g128", "8pc", "8g64"]


def _names(model, block: int, *roles: str) -> list[str]:
    """Full module names of the linears playing ``roles`` in block ``block``."""
    p = arch.projections(arch.decoder_layers(model)[block])
    return [f"{arch.block_names(model)[block]}.{p[r].name}" for r in roles]


def test_vllm_ties_qkv_and_gate_up(tiny):
    model, _ = tiny
    space = SearchSpace.build(model, "linear", [parse_choice("4g64")], tie=TARGETS["vllm"].tie(model))
    assert space.n_units == 4 * 4  # qkv, o, gate+up, down per layer
    assert _names(model, 0, "q", "k", "v") in space.unit_modules
    assert _names(model, 3, "gate", "up") in space.unit_modules
    assert f"{arch.block_names(model)[0]}.q+k+v" in space.units
    plain = SearchSpace.build(model, "linear", [parse_choice("4g64")], tie=TARGETS["llama.cpp"].tie(model))
    assert plain.n_units == 28


def test_a_target_that_runs_no_choice_is_a_recipe_error():
    doc = {"name": "t", "model": {"source": "tiny-llama"},
           "stages": {"bit_search": {"enabled": True, "avg_bits": 3.0, "choices": ["2g64", "3g64"],
                                     "target": "vllm"}}}
    with pytest.raises(RecipeError, match=r"target vllm runs none of the choices \(2g64: .*4 and 8 bits"):
        parse_recipe(doc)
    doc["stages"]["bit_search"]["target"] = "tgi"
    with pytest.raises(RecipeError, match="target"):
        parse_recipe(doc)


@pytest.mark.parametrize(("target", "fmt"), [("vllm", "compressed-tensors"), ("llama.cpp", "gguf")])
def test_searched_allocation_exports_to_its_target_without_fallback(tiny_recipe, tmp_path: Path, target, fmt):
    r = tiny_recipe
    r.stages.bit_search.enabled = True
    r.stages.bit_search.method = "importance-prior"
    r.stages.bit_search.avg_bits = 4.6
    r.stages.bit_search.choices = CHOICES
    r.stages.bit_search.target = target
    r.stages.bit_search.heldout_windows = 2
    r.stages.bit_search.heldout_seqlen = 64
    cal = run_stage("calibrate", r, {}, f"file://{tmp_path}/cal")
    res = run_stage("bit-search", r, {"calib": cal.uri}, f"file://{tmp_path}/bits")
    alloc = json.loads((tmp_path / "bits" / "allocation.json").read_text())
    assert alloc["target"] == target
    labels = {m: (e["bits"], e.get("group_size")) for m, e in alloc["modules"].items()}
    allowed = {(c.bits, c.group_size) for c in TARGETS[target].allowed(
        [parse_choice(c) for c in CHOICES], False)[0]}
    assert set(labels.values()) <= allowed and len(set(labels.values())) > 1  # mixed, all runnable
    if target == "vllm":
        from pqflow.tiny import tiny_llama

        ref, _ = tiny_llama()
        for i in range(4):
            assert len({labels[n] for n in _names(ref, i, "q", "k", "v")}) == 1
            assert len({labels[n] for n in _names(ref, i, "gate", "up")}) == 1
    search = json.loads((tmp_path / "bits" / "search.json").read_text())
    assert "2g64" in search["info"]["target"]["refused"]
    r.stages.quantize.enabled = True
    q = run_stage("quantize", r, {"allocation": res.uri}, f"file://{tmp_path}/q")
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    out = export_artifact(q.uri, fmt, f"file://{tmp_path}/{fmt}", ExportOptions(fallback="error"))
    assert out["bytes"] > 0
    if fmt == "gguf":
        assert not out["widened"] and not out["requantized"]
