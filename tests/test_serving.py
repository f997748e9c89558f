"""The registered model serves text: ``mlflow models serve`` on a version registered through the
pipeline (tiny model, RTN 4-bit, a GGUF export), OpenAI-style chat and completion requests, greedy
and seeded answers equal to pqflow's own generation token for token, 4xx on bad requests with the
server still answering; the version's tags and model card; ``pqflow promote``; docs/serving.md."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pqflow.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
DOC = REPO / "docs" / "serving.md"
MLFLOW = str(Path(sys.executable).parent / "mlflow")
NAME = "tiny-serve"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
        "temperature": 0}


def _recipe(name: str, bits: int = 4, gate: dict | None = None, export: list[str] | None = None):
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    data["model"] = {"source": "tiny-llama", "name": NAME}
    data["stages"]["quantize"] = {"enabled": True, "method": "rtn", "bits": bits, "group_size": 64}
    if export:
        data["stages"]["export"] = {"formats": export}
    data["tracking"] = {"gate": gate or {"max_ppl_increase": 1.0}}
    return parse_recipe(data)


DOC_NAME, DOC_PORT = "smollm2-demo", "5001"


def _doc(text: str, port: int) -> str:
    return text.replace(DOC_NAME, NAME).replace(DOC_PORT, str(port))


def _doc_serve_command(port: int) -> list[str]:
    """docs/serving.md's `mlflow models serve` line, for the tiny model on ``port``."""
    import shlex

    line = next(ln for ln in DOC.read_text().splitlines() if ln.startswith("mlflow models serve"))
    cmd = shlex.split(_doc(line, port))
    assert cmd[:3] == ["mlflow", "models", "serve"] and "--env-manager" in cmd and "127.0.0.1" in cmd
    return [MLFLOW, *cmd[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Version 1 of ``tiny-serve``, registered by the pipeline on a sqlite store; its gate holds, so
    it is @champion. Yields (tracking uri, artifact root, run result)."""
    from pqflow.local_run import run_plan

    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    root = f"file://{tmp / 'art'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the sqlite store's default artifact location (./mlruns) lands here
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        res = run_plan(_recipe("tiny-serve", export=["gguf"]), root, mlflow_uri=uri)
    assert res.registry["champion"] is True and res.registry["model_version"] == "1"
    return uri, root, res, tmp


@pytest.fixture(scope="module")
def server(registry):
    """``mlflow models serve -m models:/tiny-serve@champion --env-manager local`` on a free loopback port."""
    uri, _, _, tmp = registry
    port = _free_port()
    # as in an activated venv: mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(_doc_serve_command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp, env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail("mlflow models serve exited:\n" + "".join(lines)[-3000:])
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            pytest.fail("mlflow models serve did not answer /ping:\n" + "".join(lines)[-3000:])
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _post(url: str, body, raw: bool = False) -> tuple[int, dict | str]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


@pytest.fixture(scope="module")
def own(registry):
    """pqflow's own generation on the pipeline's model artifact (not through MLflow)."""
    from pqflow.artifacts import join, open_artifact
    from pqflow.models import load_model_artifact

    _, root, _, _ = registry
    return load_model_artifact(open_artifact(join(root, "tiny-serve", "quantize")).path)


def test_chat_and_completion_over_http_equal_pqflow_generation(server, own):
    from pqflow import generate

    status, body = _post(server, {**CHAT, "return_token_ids": True})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == NAME
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    ref = generate.chat(own.model, own.tokenizer, CHAT["messages"], max_tokens=12, temperature=0)
    assert body["custom_outputs"]["completion_token_ids"] == ref.token_ids
    assert body["custom_outputs"]["prompt_token_ids"] == ref.prompt_ids
    assert body["custom_outputs"]["chat_template"] == "default"  # the tiny tokenizer has none: ChatML
    assert msg["content"] == ref.text
    assert body["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": len(ref.token_ids),
                             "total_tokens": ref.prompt_tokens + len(ref.token_ids)}
    assert body["choices"][0]["finish_reason"] == ref.finish_reason

    req = {"prompt": "The capital of France is", "max_tokens": 10, "temperature": 0}
    status, body = _post(server, {**req, "return_token_ids": True})
    assert status == 200, body
    assert body["object"] == "text_completion"
    ref = generate.complete(own.model, own.tokenizer, req["prompt"], max_tokens=10, temperature=0)
    assert body["custom_outputs"]["completion_token_ids"] == ref.token_ids
    assert body["choices"][0]["text"] == ref.text and len(ref.token_ids) == 10

    # sampling with a seed is reproducible, and equal to pqflow's with the same seed
    req = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 7,
           "return_token_ids": True}
    _, a = _post(server, req)
    ref = generate.complete(own.model, own.tokenizer, req["prompt"], max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    assert a["custom_outputs"]["completion_token_ids"] == ref.token_ids


@pytest.mark.parametrize("body, says", [
    ({"messages": [], "max_tokens": 4}, "messages is empty"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x" * 1500, "max_tokens": 4}, "the prompt has 1500 tokens; the model's context is 1024"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"prompt": "hi", "temperature": 5.0}, "temperature must be between"),
    ({"prompt": "hi", "mode": "nonsense"}, "params.mode"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_answering(server, body, says):
    status, err = _post(server, body)
    assert 400 <= status < 500, (status, err)
    text = err["message"] if isinstance(err, dict) else err
    assert says in text, text
    status, ok = _post(server, {**CHAT, "max_tokens": 2})
    assert status == 200 and ok["choices"][0]["message"]["content"] is not None


def test_not_json_is_a_4xx(server):
    status, _ = _post(server, b"{not json", raw=True)
    assert 400 <= status < 500
    assert _post(server, {**CHAT, "max_tokens": 1})[0] == 200


def test_signature_example_task_and_perplexity_mode(registry, own):
    import mlflow
    from mlflow.models import Model

    from pqflow.data import load_text

    uri, _, res, _ = registry
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    mlmodel = Model.load(local / "MLmodel")
    assert mlmodel.metadata["task"] == "llm/v1/chat"
    assert {c.name for c in mlmodel.signature.inputs.inputs} >= {"messages", "prompt", "max_tokens", "temperature"}
    assert {p.name for p in mlmodel.signature.params.params} >= {"mode", "seqlen", "max_windows"}
    example = json.loads((local / "input_example.json").read_text())
    assert example["messages"][0]["role"] == "user"
    assert not list(local.rglob("*.pkl"))
    m = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = m.predict({"prompt": load_text("wikitext2", "test")}, params={"mode": "perplexity"})
    assert out["ppl"][0] == pytest.approx(res.outcomes["evaluate"].summary["ppl"], rel=1e-5)
    chat = m.predict(CHAT)
    assert chat["object"] == "chat.completion"


def test_version_tags_model_card_and_description(registry):
    import mlflow
    from mlflow import MlflowClient

    uri, _, res, _ = registry
    mv = MlflowClient(uri).get_model_version(NAME, "1")
    t = mv.tags
    ev = res.outcomes["evaluate"].summary
    base = res.outcomes["evaluate-baseline"].summary
    assert float(t["ppl"]) == pytest.approx(ev["ppl"]) and float(t["baseline_ppl"]) == pytest.approx(base["ppl"])
    assert int(t["model_bytes"]) == ev["model_bytes"] and int(t["params"]) == ev["params"]
    assert 4.0 < float(t["avg_bits"]) < 5.0  # 4-bit g64: scales and zeros included
    assert t["pqflow.methods"] == "quantize=rtn" and t["pqflow.method.quantize"] == "rtn"
    assert re.fullmatch(r"[0-9a-f]{64}", t["pqflow.recipe_digest"])
    from pqflow import __version__

    assert t["pqflow.version"] == __version__
    assert t["pqflow.export_formats"] == "gguf" and t["pqflow.export.gguf.path"] == "artifacts/exports/gguf"
    assert t["pqflow.task"] == "llm/v1/chat" and t["pqflow.chat_template"] == "default"
    assert t["pqflow.gate"] == "passed"
    card = mv.description
    assert card.startswith(f"# {NAME}") and "tiny-llama" in card
    assert "| quantize | `rtn`" in card and "| perplexity |" in card and "mlflow models serve" in card
    mlflow.set_tracking_uri(uri)
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    assert (files / "artifacts" / "MODEL_CARD.md").read_text() == card


def _promote(uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "pqflow.cli", "promote", NAME, *args], capture_output=True,
                          text=True, env=env, timeout=180)


def test_promote_rechecks_the_gate(registry):
    from mlflow import MlflowClient

    from pqflow.local_run import run_plan

    uri, root, _, tmp = registry
    c = MlflowClient(uri)
    p = _promote(uri, "--version", "1", "--alias", "prod")
    assert p.returncode == 0, p.stderr
    assert "models:/tiny-serve@prod -> version 1" in p.stdout
    assert str(c.get_model_version_by_alias(NAME, "prod").version) == "1"
    # version 2: other weights (8-bit), registered under a gate it fails: not champion, and promote refuses
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        res = run_plan(_recipe("tiny-serve-8", bits=8, gate={"max_bytes": 1000}), root, mlflow_uri=uri)
    assert res.registry["model_version"] == "2" and res.registry["champion"] is False
    p = _promote(uri, "--version", "2")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "refusing to move tiny-serve@champion to version 2: max_bytes fails" in err[0], p.stderr
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    p = _promote(uri, "--version", "9")
    assert p.returncode != 0 and "has no version '9'" in p.stderr


def test_the_docs_requests_run_as_shown(server):
    """docs/serving.md's curl requests against the server started by its serve command."""
    port = int(server.rsplit(":", 1)[1])
    lines = [ln for ln in DOC.read_text().splitlines() if ln.startswith(f"curl -s http://127.0.0.1:{DOC_PORT}/")]
    assert len(lines) == 2
    objects = []
    for ln in lines:
        p = subprocess.run(["bash", "-c", _doc(ln, port)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        objects.append(json.loads(p.stdout)["object"])
    assert objects == ["chat.completion", "text_completion"]


def test_the_docs_llama_cpp_snippet_runs_on_the_versions_gguf(registry, tmp_path):
    import shutil

    import mlflow

    pytest.importorskip("llama_cpp")
    uri, _, _, _ = registry
    mlflow.set_tracking_uri(uri)
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    shutil.copy(files / "artifacts" / "exports" / "gguf" / "model.gguf", tmp_path / "model.gguf")
    text = DOC.read_text()
    start = text.index("from llama_cpp import Llama")
    snippet = text[start:text.index("```", start)]
    p = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
