"""Shared fixtures: a seeded tiny random Llama, the local WikiText-2 copy, recipes, S3 on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def _default_data_dir() -> Path:
    return REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def data_dir() -> Path:
    """Tests read WikiText-2 from $PQFLOW_DATA_DIR (default: ../shared/data beside the repo)."""
    d = Path(os.environ.get("PQFLOW_DATA_DIR") or _default_data_dir())
    if not (d / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.exit(f"WikiText-2 raw not found under {d}; set PQFLOW_DATA_DIR", returncode=3)
    os.environ["PQFLOW_DATA_DIR"] = str(d)
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leak():
    """mlflow.set_tracking_uri / set_registry_uri export their URI: a test that points them at a
    server it then stops must not send later tests (and their subprocesses) there."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tiny():
    """(model, tokenizer) of the seeded tiny random Llama (GQA: 4 heads, 2 KV heads, 4 layers)."""
    from pqflow.tiny import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture
def tiny_recipe():
    from pqflow.recipe import load_recipe

    return load_recipe(RECIPES / "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server
