"""MLflow tracking and registry against the embedded services that ``pqflow up`` starts (one
server for the whole module: MLflow takes ~11 s to start on these CPUs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pqflow.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
PQFLOW = [sys.executable, "-m", "pqflow.cli"]


def _recipe(name: str, **tracking):
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    if tracking:
        data["tracking"] = tracking
    return parse_recipe(data)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """``pqflow up`` in a subprocess: yields (mlflow_url, s3_url, state_dir)."""
    state = tmp_path_factory.mktemp("state")
    proc = subprocess.Popen([*PQFLOW, "up", "--state-dir", str(state)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=state)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 120
    while time.time() < deadline and not any(ln.startswith("Ctrl-C") for ln in lines):
        if proc.poll() is not None:
            pytest.fail("pqflow up exited:\n" + "".join(lines))
        time.sleep(0.2)
    out = "".join(lines)
    urls = dict(ln.split(":", 1) for ln in out.splitlines() if ln.startswith(("MLflow UI:", "S3 endpoint:")))
    mlflow_url = urls["MLflow UI"].strip()
    s3_url = urls["S3 endpoint"].split()[0]
    yield mlflow_url, s3_url, state
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not (state / "services.json").exists()


@pytest.fixture
def env(up, monkeypatch):
    mlflow_url, s3_url, state = up
    for k, v in {"AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "pqflow", "AWS_SECRET_ACCESS_KEY": "pqflow-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3_url,
                 "MLFLOW_TRACKING_URI": mlflow_url}.items():
        monkeypatch.setenv(k, v)
    return mlflow_url


@pytest.fixture(scope="module")
def first_run(up):
    from pqflow.local_run import run_plan

    mlflow_url, s3_url, _ = up
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_url)
        mp.setenv("AWS_ACCESS_KEY_ID", "pqflow")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "pqflow-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        recipe = _recipe("tiny-track")
        result = run_plan(recipe, "s3://pqflow-test/artifacts", mlflow_uri=mlflow_url)
    return recipe, result


def test_up_prints_the_mlflow_ui(up):
    import urllib.request

    mlflow_url, _, _ = up
    assert mlflow_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(mlflow_url + "/health", timeout=5) as r:
        assert r.status == 200


def test_parent_run_and_one_child_per_step(env, first_run):
    from mlflow import MlflowClient

    recipe, result = first_run
    assert not any(o.skipped for o in result.outcomes.values())
    c = MlflowClient(env)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pqflow.recipe"] == "tiny-track"
    assert parent.data.params["model.source"] == "tiny-llama"
    assert parent.data.metrics["steps_run"] == 2
    children = c.search_runs([parent.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["calibrate", "evaluate"]
    ev = by_name["evaluate"]
    assert ev.data.metrics["ppl"] == pytest.approx(result.outcomes["evaluate"].summary["ppl"])
    assert ev.data.params["seqlen"] == "64" and ev.data.params["max_windows"] == "8"
    assert by_name["calibrate"].data.params["n_windows"] == "8"
    arts = {a.path for a in c.list_artifacts(ev.info.run_id)} | {
        a.path for a in c.list_artifacts(ev.info.run_id, "outputs")}
    assert {"manifest.json", "outputs/metrics.json", "gate_decision.json"} <= arts
    cal_arts = {a.path for a in c.list_artifacts(by_name["calibrate"].info.run_id, "outputs")}
    assert "outputs/calib.json" in cal_arts


def test_candidate_loads_back_and_reproduces_ppl(env, first_run):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pqflow.data import load_text

    recipe, result = first_run
    logged = result.outcomes["evaluate"].summary["ppl"]
    assert result.registry["registered_model"] == "tiny-track"
    c = MlflowClient(env)
    mv = c.get_model_version_by_alias("tiny-track", "candidate")
    assert mv.version == result.registry["model_version"]
    mlflow.set_tracking_uri(env)
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-track@candidate"))
    assert not list(local.rglob("*.pkl")), "the logged model must not contain pickles"
    assert list(local.rglob("*.safetensors"))
    assert "pyfunc_model.py" in (local / "MLmodel").read_text()
    model = mlflow.pyfunc.load_model("models:/tiny-track@candidate")
    text = load_text("wikitext2", "test")
    out = model.predict(pd.DataFrame({"prompt": [text]}), params={"mode": "perplexity"})
    assert out["ppl"][0] == pytest.approx(logged, rel=1e-5)
    assert out["windows"][0] == 8


def test_second_run_reuses_every_step_and_the_registered_version(env, first_run):
    from pqflow.local_run import run_plan

    recipe, first = first_run
    again = run_plan(recipe, "s3://pqflow-test/artifacts", mlflow_uri=env)
    assert again.reused_all
    assert again.registry["model_version"] == first.registry["model_version"]
    assert again.parent_run_id != first.parent_run_id
    print(f"first run {first.seconds:.2f}s, second {again.seconds:.2f}s")
    assert again.seconds < 0.5 * first.seconds


def test_champion_moves_only_when_the_gate_holds(env):
    import mlflow
    from mlflow import MlflowClient

    from pqflow.local_run import run_plan

    c = MlflowClient(env)
    mlflow.set_tracking_uri(env)
    # A gate that needs a baseline but the run has none: candidate yes, champion no.
    strict = _recipe("tiny-gate", gate={"max_ppl_increase": 0.05})
    res = run_plan(strict, "s3://pqflow-test/artifacts", mlflow_uri=env)
    assert res.registry["champion"] is False
    assert "evaluate-baseline" in res.registry["gate_reason"]
    assert c.get_model_version_by_alias("tiny-gate", "candidate")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        c.get_model_version_by_alias("tiny-gate", "champion")
    decision = mlflow.artifacts.load_dict(f"runs:/{res.parent_run_id}/gate_decision.json")
    assert decision["champion"] is False and decision["checks"][0]["check"] == "max_ppl_increase"
    assert c.get_run(res.parent_run_id).data.tags["pqflow.gate"] == "failed"
    # A size gate that holds: champion moves to the version.
    ok = _recipe("tiny-gate", gate={"max_bytes": 10**9})
    res2 = run_plan(ok, "s3://pqflow-test/artifacts", mlflow_uri=env)
    assert res2.registry["champion"] is True
    assert c.get_model_version_by_alias("tiny-gate", "champion").version == res2.registry["model_version"]


def test_gate_against_the_baseline_of_the_same_run():
    from pqflow.tracking import gate_decision

    r = _recipe("g", gate={"max_ppl_increase": 0.10, "max_bytes": 1000})
    held = gate_decision(r, {"ppl": 10.9, "model_bytes": 900}, {"ppl": 10.0})
    assert held["champion"] and held["checks"][0]["value"] == pytest.approx(0.09)
    worse = gate_decision(r, {"ppl": 11.5, "model_bytes": 900}, {"ppl": 10.0})
    assert not worse["champion"] and "max_ppl_increase fails" in worse["reason"]
    big = gate_decision(r, {"ppl": 10.0, "model_bytes": 2000}, {"ppl": 10.0})
    assert not big["champion"] and "max_bytes" in big["reason"]
    assert not gate_decision(_recipe("g"), {"ppl": 1.0}, {"ppl": 1.0})["champion"]  # no gate, no champion


def test_cli_run_uses_the_running_services(up, tmp_path):
    mlflow_url, _, state = up
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    p = subprocess.run([*PQFLOW, "run", str(TINY), "--root", "s3://pqflow/cli", "--state-dir", str(state)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "using the services of 'pqflow up'" in p.stderr
    assert "models:/tiny@candidate" in p.stdout
    assert mlflow_url in p.stdout


def test_cluster_stages_find_one_parent_by_the_kfp_run_id(env, tmp_path):
    """On a cluster no client creates the parent run: each component finds it by the KFP run id."""
    from mlflow import MlflowClient

    from pqflow.local_run import run_step
    from pqflow.plan import plan

    recipe = _recipe("tiny-kfp")
    outs = {}
    for step in plan(recipe):
        outs[step.name] = run_step(step, recipe, f"file://{tmp_path / 'art'}", outs, tmp_path / "kfp",
                                   mlflow_uri=env, parent_run="", run_key="kfp-run-123")
    assert outs["evaluate"].metadata["registered_model"] == "tiny-kfp"
    c = MlflowClient(env)
    exp = c.get_experiment_by_name("pqflow").experiment_id
    parents = c.search_runs([exp], "tags.`pqflow.run_key` = 'kfp-run-123'")
    assert len(parents) == 1
    assert parents[0].data.tags["pqflow.orchestrator"] == "kfp"
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["calibrate", "evaluate"]
