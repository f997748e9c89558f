"""The ``export`` stage in the pipeline: recipe section, plan, KFP wiring, verified artifacts on
file:// and s3://, and the registered model version carrying the exports (files + tags)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pqflow.artifacts import MANIFEST, open_artifact
from pqflow.errors import RecipeError
from pqflow.plan import plan
from pqflow.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
FORMATS = ["hf-dense", "compressed-tensors"]  # what the tiny model's 4-bit g64 RTN codes export to


def _recipe(name: str = "tiny-export", export: dict | None = None, quantize: bool = True):
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    if quantize:
        data["stages"]["quantize"] = {"enabled": True, "method": "rtn", "bits": 4, "group_size": 64}
    if export is not None:
        data["stages"]["export"] = export
    return parse_recipe(data)


# -- recipe ------------------------------------------------------------------------------------------

def test_unknown_format_is_one_line_naming_it():
    with pytest.raises(RecipeError) as e:
        _recipe(export={"formats": ["gguf", "onnx"]})
    msg = str(e.value)
    assert "\n" not in msg
    assert "stages.export.formats" in msg and "'onnx'" in msg and "gguf" in msg


def test_duplicate_format_and_bad_options_are_recipe_errors():
    with pytest.raises(RecipeError, match="'gguf' is listed twice"):
        _recipe(export={"formats": ["gguf", "gguf"]})
    with pytest.raises(RecipeError, match="stages.export.uneven"):
        _recipe(export={"formats": ["gguf"], "uneven": "crop"})
    with pytest.raises(RecipeError, match="unknown key 'format'.*did you mean 'formats'"):
        _recipe(export={"format": ["gguf"]})


def test_defaults():
    cfg = _recipe().stages.export
    assert (cfg.formats, cfg.fallback, cfg.dtype, cfg.uneven) == ([], "error", "float16", "error")


# -- plan --------------------------------------------------------------------------------------------

def test_plan_has_export_only_when_formats_are_given():
    assert "export" not in [s.name for s in plan(_recipe())]
    assert "export" not in [s.name for s in plan(_recipe(export={"enabled": True}))]
    assert "export" not in [s.name for s in plan(_recipe(export={"enabled": False, "formats": FORMATS}))]
    steps = {s.name: s for s in plan(_recipe(export={"formats": FORMATS}))}
    names = list(steps)
    assert names.index("quantize") < names.index("export") < names.index("evaluate")
    assert steps["export"].inputs == {"model": "quantize"}
    assert steps["evaluate"].inputs == {"model": "quantize", "export": "export"}
    assert steps["evaluate-baseline"].inputs == {}


def test_export_without_a_model_making_stage_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"stages.export: needs \['model'\]"):
        plan(_recipe(export={"formats": ["hf-dense"]}, quantize=False))


def test_kfp_pipeline_has_an_export_task_in_its_own_image(tmp_path):
    from pqflow.pipelines.compression import ClusterOptions, compile_pipeline

    out = compile_pipeline(_recipe(export={"formats": FORMATS}), tmp_path / "p.yaml",
                           ClusterOptions(registry="reg.example", version="9.9"))
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    comp = spec["components"][tasks["export"]["componentRef"]["name"]]
    image = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]["image"]
    assert image == "reg.example/pqflow-export:9.9"
    arts = tasks["evaluate"]["inputs"]["artifacts"]
    assert arts["export"]["taskOutputArtifact"] == {"producerTask": "export", "outputArtifactKey": "exported"}
    assert (REPO / "docker" / "export.Dockerfile").is_file()


# -- artifacts ---------------------------------------------------------------------------------------

def _check_export_artifact(uri: str, formats: list[str]) -> dict:
    art = open_artifact(uri)
    index = {e["format"]: e for e in json.loads((art.path / "exports.json").read_text())["formats"]}
    assert list(index) == formats
    for fmt in formats:
        sub = open_artifact(f"{uri}/{fmt}")  # every format is a verified artifact of its own
        assert sub.manifest["summary"]["format"] == fmt
        assert sub.digest == index[fmt]["digest"] and sub.manifest["bytes"] == index[fmt]["bytes"]
        assert f"{fmt}/{MANIFEST}" in art.manifest["files"]  # and part of the stage's artifact
        assert art.manifest["summary"][f"bytes.{fmt}"] == index[fmt]["bytes"]
    return art.manifest


def test_export_stage_on_s3_is_verified_and_skipped_when_up_to_date(tmp_path, s3_env):
    from pqflow.artifacts import check_reachable
    from pqflow.runner import run_stage

    recipe = _recipe("tiny-export-s3", export={"formats": FORMATS})
    root = "s3://pqflow-export/arts"
    check_reachable(root)
    q = run_stage("quantize", recipe, {}, f"{root}/quantize")
    ex = run_stage("export", recipe, {"model": q.uri}, f"{root}/export")
    assert not ex.skipped
    _check_export_artifact(ex.uri, FORMATS)
    again = run_stage("export", recipe, {"model": q.uri}, f"{root}/export")
    assert again.skipped and again.manifest["digest"] == ex.manifest["digest"]


# -- end to end with the registry ----------------------------------------------------------------------

@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A server-less MLflow (sqlite store, artifacts under the test's folder)."""
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts in ./mlruns
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_pipeline_exports_and_the_model_version_carries_them(tmp_path, mlflow_sqlite):
    import mlflow
    from mlflow import MlflowClient

    from pqflow.local_run import run_plan

    recipe = _recipe(export={"formats": FORMATS})
    root = f"file://{tmp_path / 'art'}"
    res = run_plan(recipe, root, mlflow_uri=mlflow_sqlite)
    export_uri = res.outcomes["export"].uri
    manifest = _check_export_artifact(export_uri, FORMATS)
    assert manifest["inputs"]["model"]["uri"] == res.outcomes["quantize"].uri

    client = MlflowClient(mlflow_sqlite, registry_uri=mlflow_sqlite)
    name, version = res.registry["registered_model"], res.registry["model_version"]
    tags = client.get_model_version(name, version).tags
    assert tags["pqflow.export_formats"] == "hf-dense,compressed-tensors"
    assert tags["pqflow.export_uri"] == export_uri and tags["pqflow.export_digest"] == manifest["digest"]
    for fmt in FORMATS:
        sub = open_artifact(f"{export_uri}/{fmt}")
        assert tags[f"pqflow.export.{fmt}.uri"] == f"{export_uri}/{fmt}"
        assert tags[f"pqflow.export.{fmt}.digest"] == sub.digest
        assert tags[f"pqflow.export.{fmt}.bytes"] == str(sub.manifest["bytes"])
    # the version's files hold every export with its manifest: a download verifies
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    for fmt in FORMATS:
        got = files / tags[f"pqflow.export.{fmt}.path"]
        assert open_artifact(f"file://{got}").digest == tags[f"pqflow.export.{fmt}.digest"]
    # the export step's child run: formats as a param, bytes per format as metrics
    run = client.get_run(res.outcomes["export"].pointer["mlflow_run_id"])
    assert json.loads(run.data.params["formats"]) == FORMATS
    assert run.data.metrics["bytes.hf-dense"] == manifest["summary"]["bytes.hf-dense"]

    again = run_plan(recipe, root, mlflow_uri=mlflow_sqlite)
    assert again.reused_all and str(again.registry["model_version"]) == str(version)

    # Another export of the same weights: only export runs again (evaluate's metrics do not depend
    # on it), and the registry gets a new version carrying the new export.
    other = _recipe(export={"formats": ["hf-dense"]})
    third = run_plan(other, root, mlflow_uri=mlflow_sqlite)
    assert not third.outcomes["export"].skipped
    assert third.outcomes["evaluate"].skipped and third.outcomes["quantize"].skipped
    v3 = str(third.registry["model_version"])
    assert v3 != str(version)
    assert client.get_model_version(name, v3).tags["pqflow.export_formats"] == "hf-dense"
