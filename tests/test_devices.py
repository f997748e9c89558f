"""Per-stage device and dtype: recipe checks, resolution, and a stage that computes where told."""

from __future__ import annotations

import pytest
import torch
import yaml

from pqflow.devices import place, resolve_device
from pqflow.errors import PqflowError, RecipeError
from pqflow.recipe import parse_recipe

from .conftest import RECIPES


def _recipe(**calibrate):
    data = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    data["stages"]["calibrate"].update(calibrate)
    return parse_recipe(data)


def test_device_and_gpu_request_must_agree():
    with pytest.raises(RecipeError, match="needs resources.gpu >= 1"):
        _recipe(device="cuda")
    with pytest.raises(RecipeError, match="GPUs it never uses"):
        _recipe(device="cpu", resources={"gpu": 1})
    with pytest.raises(RecipeError, match="device"):
        _recipe(device="tpu")
    assert _recipe(device="cuda:1", resources={"gpu": 2}).stages.calibrate.device == "cuda:1"
    assert _recipe().stages.calibrate.device == "auto"


def test_auto_is_cuda_only_when_present_and_a_missing_gpu_is_an_error():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PqflowError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_place_casts_to_the_stage_dtype_and_keeps_rotary_frequencies(tiny):
    from pqflow.tiny import tiny_llama

    model, _ = tiny_llama()
    inv = [b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")]
    dev = place(model, "cpu", "bfloat16")
    assert dev == torch.device("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert [b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")] == [t.dtype for t in inv]
    with torch.no_grad():
        assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.bfloat16


def test_calibrate_stage_runs_in_the_dtype_it_is_given(tmp_path):
    from pqflow.runner import run_stage

    out = run_stage("calibrate", _recipe(device="cpu", dtype="bfloat16"), {}, f"file://{tmp_path / 'c'}")
    assert out.manifest["params"]["stage"]["dtype"] == "bfloat16"
