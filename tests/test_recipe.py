from pathlib import Path

import pytest
import yaml

from pqflow.cli import main
from pqflow.errors import RecipeError
from pqflow.recipe import load_recipe, parse_recipe

from .conftest import RECIPES


def _tiny() -> dict:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


def test_shipped_recipes_validate():
    for path in RECIPES.glob("*.yaml"):
        load_recipe(path)


def test_misspelt_key_is_named_with_its_path():
    data = _tiny()
    data["stages"]["calibrate"]["n_windowz"] = 4
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert "stages.calibrate.n_windowz" in msg
    assert "did you mean 'n_windows'" in msg


def test_wrong_type_and_range_are_named():
    data = _tiny()
    data["stages"]["evaluate"]["seqlen"] = "long"
    data["stages"]["prune"] = {"ratio": 1.5}
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert "stages.evaluate.seqlen" in str(e.value)
    assert "stages.prune.ratio" in str(e.value)


def test_unknown_model_source_rejected():
    data = _tiny()
    data["model"]["source"] = "gpt-5"
    with pytest.raises(RecipeError, match="model.source"):
        parse_recipe(data)


def test_same_local_file_for_calibration_and_evaluation_rejected():
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": "text:/tmp/a.txt"}
    data["stages"]["evaluate"]["data"] = {"source": "text:/tmp/a.txt"}
    with pytest.raises(RecipeError, match="different files"):
        parse_recipe(data)


def test_cli_validate_exit_codes(tmp_path: Path, capsys):
    assert main(["validate", str(RECIPES / "tiny.yaml")]) == 0
    bad = _tiny()
    bad["modle"] = bad.pop("model")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(p)]) != 0
    err = capsys.readouterr().err
    assert "modle" in err and "model" in err


def test_missing_recipe_file_and_bad_yaml(tmp_path: Path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) != 0
    assert "not found" in capsys.readouterr().err
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed")
    assert main(["validate", str(p)]) != 0
    assert "not valid YAML" in capsys.readouterr().err
