"""Embedded services: start/stop, S3 contents kept across restarts, a whole ``pqflow run`` with its
own S3 + MLflow (twice: the second reuses everything), and fast, clean failures when an endpoint
does not answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqflow import services
from pqflow.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_DEFAULT_REGION", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")


@pytest.fixture
def clean_env(monkeypatch):
    """No endpoint from the environment; whatever ``pqflow run`` sets is undone afterwards."""
    for k in CLIENT_ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _dead_port() -> int:
    return services.free_port()  # free now, so nothing answers there


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child counts as dead
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_s3_contents_survive_a_restart(tmp_path):
    svc = services.start(tmp_path, mlflow=False)
    try:
        s3 = services._client(svc.s3_url)
        s3.create_bucket(Bucket="keep")
        s3.put_object(Bucket="keep", Key="a/b.txt", Body=b"hello")
        assert services.running(tmp_path).s3_url == svc.s3_url  # found through services.json
    finally:
        svc.stop()
    assert not _alive(svc.pids["s3"])
    assert (tmp_path / "s3" / "keep" / "a" / "b.txt").read_bytes() == b"hello"
    assert services.running(tmp_path) is None
    svc2 = services.start(tmp_path, mlflow=False)
    try:
        body = services._client(svc2.s3_url).get_object(Bucket="keep", Key="a/b.txt")["Body"].read()
        assert body == b"hello"
    finally:
        svc2.stop()


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return subprocess.run([sys.executable, "-m", "pqflow.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=400)


def test_pqflow_run_embedded_twice(tmp_path):
    """The one-command local run: embedded S3 + MLflow started and stopped by ``pqflow run``; a
    second run restores the S3 contents, reuses every step and the registered version."""
    state = tmp_path / "state"
    args = ["run", str(TINY), "--root", "s3://pqflow/artifacts", "--state-dir", str(state)]
    first = _run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "starting embedded S3 + MLflow" in first.stderr
    assert "models:/tiny@candidate (version 1)" in first.stdout
    assert "metrics: MLflow http://127.0.0.1:" in first.stdout
    assert "0/2 steps reused" in first.stdout
    assert not (state / "services.json").exists()  # stopped at the end
    assert (state / "s3" / "pqflow" / "artifacts" / "tiny" / "evaluate" / "manifest.json").is_file()
    assert (state / "mlflow.db").is_file()

    second = _run_cli(args, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "2/2 steps reused" in second.stdout
    assert "models:/tiny@candidate (version 1)" in second.stdout  # same weights, same version
    t1 = float(re.search(r"run finished in ([\d.]+)s", first.stdout).group(1))
    t2 = float(re.search(r"run finished in ([\d.]+)s", second.stdout).group(1))
    print(f"pipeline time: first {t1:.1f}s, second {t2:.1f}s")
    assert t2 < 0.5 * t1


def test_unreachable_s3_fails_fast_naming_the_endpoint(clean_env, tmp_path, capsys):
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    t0 = time.monotonic()
    rc = main(["run", str(TINY), "--root", "s3://bucket/prefix", "--s3-endpoint", endpoint, "--no-tracking",
               "--state-dir", str(tmp_path / "state")])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2
    assert endpoint in err and "unreachable" in err
    assert took < 60
    assert not (tmp_path / "state").exists()  # nothing embedded was started


def test_unreachable_mlflow_fails_fast_and_writes_no_artifact(clean_env, tmp_path, capsys):
    uri = f"http://127.0.0.1:{_dead_port()}"
    root = tmp_path / "artifacts"
    t0 = time.monotonic()
    rc = main(["run", str(TINY), "--root", f"file://{root}", "--mlflow-uri", uri])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2
    assert f"MLflow tracking server {uri} unreachable" in err
    assert took < 60
    assert not list(root.rglob("manifest.json"))


def test_unreachable_s3_for_a_given_mlflow_is_named(clean_env, tmp_path, capsys):
    """Embedded MLflow over a user's S3 endpoint that does not answer."""
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    clean_env.setenv("AWS_ACCESS_KEY_ID", "x")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "y")
    rc = main(["run", str(TINY), "--root", f"file://{tmp_path / 'a'}", "--s3-endpoint", endpoint,
               "--state-dir", str(tmp_path / "state")])
    assert rc == 2
    assert endpoint in capsys.readouterr().err
    assert not list((tmp_path / "a").rglob("manifest.json"))
