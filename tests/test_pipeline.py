"""The KFP pipeline: compiled IR YAML (tasks, images, resources), submit and schedule through
kfp.Client against a local stub of the KFP REST API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pqflow.cli import main
from pqflow.plan import plan
from pqflow.recipe import STAGE_ORDER, Recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
STAGE_NAMES = {"calibrate": "calibrate", "importance": "importance", "prune": "prune", "bit_search": "bit-search",
               "quantize": "quantize", "finetune": "finetune", "evaluate": "evaluate"}


def _all_stages_recipe() -> Recipe:
    stages = {}
    for i, key in enumerate(STAGE_ORDER):
        res = {"cpu": str(i + 1), "memory": f"{i + 2}Gi", "node_selector": {"pool": f"pool-{key}"}}
        if key in ("quantize", "finetune"):
            res.update(gpu=1, gpu_type="nvidia.com/gpu")
        stages[key] = {"enabled": True, "resources": res}
    # Schema only: compiling needs no stage implementation (they run in their own images).
    return Recipe.model_validate({"name": "all-stages", "model": {"source": "tiny-llama"}, "stages": stages,
                                  "storage": {"root": "s3://bucket/pqflow"}})


def _compile(recipe: Recipe, tmp_path: Path, **kw) -> tuple[dict, dict]:
    from pqflow.pipelines.compression import ClusterOptions, compile_pipeline

    out = compile_pipeline(recipe, tmp_path / "p.yaml", ClusterOptions(**kw))
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _executor(spec: dict, task: str) -> dict:
    comp = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["deploymentSpec"]["executors"][spec["components"][comp]["executorLabel"]]["container"]


def test_all_seven_stages_compile_with_own_images_and_resources(tmp_path):
    recipe = _all_stages_recipe()
    spec, platform = _compile(recipe, tmp_path, registry="registry.example/ml", version="1.2.3")
    tasks = spec["root"]["dag"]["tasks"]
    steps = plan(recipe)
    assert sorted(tasks) == sorted(s.name for s in steps)  # one task per planned step
    # The seven stages, plus the baseline evaluation of the uncompressed model (same image as evaluate).
    assert {s.stage for s in steps} == set(STAGE_NAMES.values())
    images = {}
    for step in steps:
        c = _executor(spec, step.name)
        assert c["image"] == f"registry.example/ml/pqflow-{step.stage}:1.2.3"
        images[step.stage] = c["image"]
        key = next(k for k, v in STAGE_NAMES.items() if v == step.stage)
        want = recipe.stage(key).resources
        assert c["resources"]["resourceCpuRequest"] == want.cpu == c["resources"]["resourceCpuLimit"]
        assert c["resources"]["resourceMemoryRequest"] == want.memory
        if want.gpu:
            assert c["resources"]["accelerator"]["resourceCount"] == "1"
            assert c["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        else:
            assert "accelerator" not in c["resources"]
        comp = tasks[step.name]["componentRef"]["name"]
        exec_label = spec["components"][comp]["executorLabel"]
        sel = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][exec_label]["nodeSelector"]
        assert sel["labels"] == {"pool": f"pool-{key}"}
        assert tasks[step.name]["taskInfo"]["name"] == step.name
    assert len(set(images.values())) == 7
    # Wiring follows the plan: every input comes from the step plan() says.
    for step in steps:
        arts = tasks[step.name]["inputs"].get("artifacts", {})
        assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in arts.items()} == step.inputs
    assert "evaluate-baseline" in tasks["evaluate"]["dependentTasks"]
    # The recipe travels as a pipeline parameter; the root is the recipe's.
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(params["recipe"]["defaultValue"])["name"] == "all-stages"
    assert params["root"]["defaultValue"] == "s3://bucket/pqflow"


def test_disabled_stages_have_no_task(tmp_path, tiny_recipe):
    spec, _ = _compile(tiny_recipe, tmp_path)
    assert sorted(spec["root"]["dag"]["tasks"]) == ["calibrate", "evaluate"]
    assert _executor(spec, "calibrate")["image"].endswith("/pqflow-calibrate:0.1.0")
    # lightweight component: the container runs the component function, nothing installed at start-up
    c = _executor(spec, "evaluate")
    assert "pip install" not in " ".join(c["command"])
    assert "run_component" in " ".join(c["args"] + c["command"])


def test_s3_secret_and_env_reach_every_task(tmp_path, tiny_recipe):
    _, platform = _compile(tiny_recipe, tmp_path, s3_secret="pqflow-s3", env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(execs) == 2
    for e in execs.values():
        keys = {m["envVar"] for m in e["secretAsEnv"][0]["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= keys


def test_cli_compile_warns_about_methods_this_build_lacks(tmp_path, capsys):
    rec = yaml.safe_load(TINY.read_text())
    rec["stages"]["prune"] = {"enabled": True, "method": "width"}
    rec["stages"]["importance"] = {"enabled": True}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(rec))
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", str(p), "-o", str(out), "--registry", "reg.local"]) == 0
    spec = yaml.safe_load(out.read_text().split("\n---\n")[0])
    assert sorted(spec["root"]["dag"]["tasks"]) == ["calibrate", "evaluate", "evaluate-baseline", "importance", "prune"]
    msg = capsys.readouterr()
    assert "5 tasks" in msg.out


def test_cli_compile_bad_recipe_is_one_line(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {source: tiny-llama}\nstages: {prune: {enabled: true, ratio: 2}}\n")
    assert main(["compile", str(p), "-o", str(tmp_path / "o.yaml")]) == 2
    assert "stages.prune.ratio" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


# -- submit / schedule against a stub of the KFP REST API ----------------------------------------------

class _KfpStub(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def _reply(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        path = self.path.split("?")[0]
        self.requests.append({"method": self.command, "path": path, "query": self.path.partition("?")[2],
                              "body": body, "auth": self.headers.get("Authorization")})
        if self.command == "POST" and path.endswith("/experiments"):
            out = {"experiment_id": "exp-1", "display_name": body["display_name"]}
        elif self.command == "POST" and path.endswith("/runs"):
            out = {"run_id": "run-42", "display_name": body["display_name"]}
        elif self.command == "POST" and path.endswith("/recurringruns"):
            out = {"recurring_run_id": "rr-7", "display_name": body["display_name"]}
        else:
            out = {}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_stub():
    _KfpStub.requests = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _KfpStub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", _KfpStub.requests
    srv.shutdown()
    srv.server_close()


def test_submit_creates_a_run_from_the_compiled_pipeline(kfp_stub, capsys):
    host, reqs = kfp_stub
    assert main(["submit", str(TINY), "--host", host, "--root", "s3://b/p", "--experiment", "nightly",
                 "--registry", "reg.local/team"]) == 0
    assert "run-42" in capsys.readouterr().out
    posts = [r for r in reqs if r["method"] == "POST"]
    assert [r["path"] for r in posts] == ["/apis/v2beta1/experiments", "/apis/v2beta1/runs"]
    assert posts[0]["body"]["display_name"] == "nightly"
    run = posts[1]["body"]
    assert run["experiment_id"] == "exp-1"
    spec = run["pipeline_spec"]
    assert sorted(spec["root"]["dag"]["tasks"]) == ["calibrate", "evaluate"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"reg.local/team/pqflow-calibrate:0.1.0", "reg.local/team/pqflow-evaluate:0.1.0"}
    assert spec["root"]["inputDefinitions"]["parameters"]["root"]["defaultValue"] == "s3://b/p"


def test_schedule_creates_a_recurring_run(kfp_stub, capsys):
    host, reqs = kfp_stub
    assert main(["schedule", str(TINY), "--host", host, "--cron", "30 2 * * 1", "--root", "s3://b/p",
                 "--name", "weekly-tiny"]) == 0
    assert "rr-7" in capsys.readouterr().out
    rr = [r for r in reqs if r["method"] == "POST" and r["path"] == "/apis/v2beta1/recurringruns"]
    assert len(rr) == 1
    body = rr[0]["body"]
    assert body["display_name"] == "weekly-tiny"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * 1"  # KFP's six-field cron
    assert body["max_concurrency"] == "1" or body["max_concurrency"] == 1
    assert body["mode"] == "ENABLE"
    assert sorted(body["pipeline_spec"]["root"]["dag"]["tasks"]) == ["calibrate", "evaluate"]


def test_bad_cron_and_unreachable_host_fail_cleanly(capsys):
    assert main(["schedule", str(TINY), "--host", "http://127.0.0.1:9", "--cron", "every day"]) == 2
    assert "--cron" in capsys.readouterr().err
    assert main(["submit", str(TINY), "--host", "http://127.0.0.1:9"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err


# -- resume ------------------------------------------------------------------------------------------

def test_a_step_that_dies_midway_leaves_no_manifest_and_is_redone(tmp_path, tiny_recipe, monkeypatch):
    import pqflow.stages.evaluate as ev
    from pqflow.local_run import run_plan

    root = f"file://{tmp_path / 'art'}"
    real = ev.run

    def dies(recipe, inputs, out):
        (out / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # as if killed mid-way

    monkeypatch.setattr(ev, "run", dies)
    with pytest.raises(KeyboardInterrupt):
        run_plan(tiny_recipe, root)
    base = tmp_path / "art" / "tiny"
    assert (base / "calibrate" / "manifest.json").is_file()
    assert sorted(p.name for p in base.iterdir()) == ["calibrate"]  # no evaluate, no partial folder
    monkeypatch.setattr(ev, "run", real)
    res = run_plan(tiny_recipe, root)
    assert res.outcomes["calibrate"].skipped and not res.outcomes["evaluate"].skipped
    again = run_plan(tiny_recipe, root)
    assert again.reused_all
