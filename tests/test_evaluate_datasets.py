"""Evaluation on several test texts (``stages.evaluate.datasets``) and the quality gate's limit per dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pqflow.stages.evaluate as evaluate
from pqflow.errors import RecipeError
from pqflow.recipe import parse_recipe
from pqflow.runner import run_stage

BASE = {"name": "ev", "model": {"source": "tiny-llama"}}


def _recipe(evaluate_cfg: dict, gate: dict | None = None):
    return parse_recipe({**BASE, "stages": {"evaluate": evaluate_cfg}, "tracking": {"gate": gate or {}}})


def _text(path: Path, words: str) -> Path:
    path.write_text("\n".join(f"{words} number {i}, and then some more {words}." for i in range(600)))
    return path


@pytest.mark.parametrize("cfg, gate, says", [
    ({"datasets": [{"name": "Bad-Name", "source": "python-reference"}]}, None, "datasets.0.name"),
    ({"datasets": [{"name": "a", "source": "python-reference"}, {"name": "a", "source": "wikitext2"}]}, None,
     "dataset name 'a' is used twice"),
    ({"datasets": [{"name": "code", "source": "python-reference"}]}, {"datasets": {"legal": {"max_ppl_increase": 1}}},
     "'legal' is not a dataset of stages.evaluate.datasets (code)"),
    ({"data": {"mix": [{"source": "wikitext2"}, {"source": "python-reference"}]}}, None, "not a mixture"),
    ({"datasets": [{"name": "x", "source": "nowhere"}]}, None, "datasets.0.source"),
])
def test_bad_dataset_settings_are_one_clear_error(cfg, gate, says):
    with pytest.raises(RecipeError) as e:
        _recipe(cfg, gate)
    assert says in str(e.value)


def test_training_on_an_evaluation_dataset_is_refused():
    with pytest.raises(RecipeError) as e:
        parse_recipe({**BASE, "stages": {"calibrate": {"data": {"mix": [{"source": "wikitext2"},
                                                                        {"source": "python-reference"}]}},
                                         "evaluate": {"datasets": [{"name": "pyref", "source": "python-reference"}]}}})
    assert "stages.evaluate.datasets.0" in str(e.value)


def _evaluate(recipe, out: Path) -> dict:
    run_stage("evaluate", recipe, {}, str(out))
    return json.loads((out / evaluate.METRICS_FILE).read_text())


def test_every_dataset_is_scored_and_the_baseline_cache_keys_on_the_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PQFLOW_CACHE_DIR", str(tmp_path / "cache"))
    prose = _text(tmp_path / "prose.txt", "a quiet river runs past the old mill")
    code = _text(tmp_path / "code.txt", "def f(x): return x + 1  # the function")
    cfg = {"max_windows": 4, "seqlen": 64, "data": {"source": f"text:{prose}"}}
    one = _evaluate(_recipe(cfg), tmp_path / "e1")
    assert "datasets" in one and one["datasets"] == []
    cfg["datasets"] = [{"name": "code", "source": f"text:{code}"}]
    capsys.readouterr()
    two = _evaluate(_recipe(cfg), tmp_path / "e2")
    assert "reused" not in two, "a new dataset must be measured, not served from the cache"
    assert two["ppl"] == pytest.approx(one["ppl"])
    assert two["ppl_code"] > 0 and two["ppl_code"] != two["ppl"] and "nll_code" in two
    assert two["datasets"][0]["name"] == "code" and two["datasets"][0]["windows"] == 4
    assert "ppl_code" in capsys.readouterr().out
    again = _evaluate(_recipe(cfg), tmp_path / "e3")
    assert again["reused"] is True and again["ppl_code"] == two["ppl_code"]


def test_gate_limits_each_dataset():
    from pqflow.tracking import gate_decision

    r = _recipe({"datasets": [{"name": "code", "source": "python-reference"}]},
                {"max_ppl_increase": 0.5, "datasets": {"code": {"max_ppl_increase": 0.2}}})
    base = {"ppl": 10.0, "ppl_code": 5.0}
    held = gate_decision(r, {"ppl": 11.0, "ppl_code": 5.5}, base)
    assert held["champion"] and [c["check"] for c in held["checks"]] == ["max_ppl_increase", "max_ppl_increase[code]"]
    worse = gate_decision(r, {"ppl": 11.0, "ppl_code": 7.0}, base)
    assert not worse["champion"] and "max_ppl_increase[code] fails (0.4 > 0.2)" in worse["reason"]
    missing = gate_decision(r, {"ppl": 11.0, "ppl_code": 5.5}, {"ppl": 10.0})
    assert not missing["champion"] and "reports no ppl_code" in missing["reason"]


def test_gate_round_trips_through_mlflow_params():
    from pqflow.recipe import QualityGate
    from pqflow.tracking import gate_from_params, gate_params

    gate = QualityGate(max_ppl_increase=0.3, datasets={"code": {"max_ppl_increase": 0.35}})
    params = gate_params(gate)
    assert all(isinstance(v, str) for v in params.values())
    assert gate_from_params(params) == gate
    # a run logged before per-dataset limits existed
    assert gate_from_params({"gate.max_ppl_increase": "0.1", "gate.max_bytes": "None"}).datasets == {}


def test_model_card_rows_name_each_dataset():
    from pqflow.model_card import _eval_rows

    r = _recipe({"datasets": [{"name": "code", "source": "python-reference"}]})
    rows = _eval_rows({"ppl": 11.0, "ppl_code": 6.0}, {"ppl": 10.0, "ppl_code": 5.0}, r)
    line = next(x for x in rows if "python-reference" in x)
    assert "(code)" in line and "+20.0%" in line


def test_finetune_refuses_a_mixture_it_cannot_sample_yet():
    with pytest.raises(RecipeError) as e:
        parse_recipe({**BASE, "stages": {"finetune": {"enabled": True, "data": {"mix": [{"source": "wikitext2"}]}}}})
    assert "fine-tuning on a mixture is not supported yet" in str(e.value)
