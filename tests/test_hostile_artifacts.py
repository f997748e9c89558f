"""Artifacts and outputs under attack (lead's part of test_hostile.py)."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pqflow.artifacts import (
    MANIFEST,
    build_manifest,
    canonical_digest,
    open_artifact,
    publish,
    staging_dir,
)
from pqflow.cli import main
from pqflow.errors import ArtifactError, PqflowError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


def _make(uri: str, files: dict[str, bytes]) -> dict:
    work = staging_dir(uri)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    manifest = build_manifest(work, stage="test", params={}, inputs={}, fingerprint="fp")
    publish(work, uri, manifest)
    return manifest


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pqflow: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "results.csv").write_text("1,2,3")
    return path


def _intact(path: Path) -> bool:
    return ((path / "thesis.tex").read_text() == "years of work"
            and (path / "data" / "results.csv").read_text() == "1,2,3")


# -- 1. an S3 artifact cannot write or delete outside the cache ------------------------------------

def _put_s3_artifact(prefix: str, manifest: dict, objects: dict[str, bytes]) -> None:
    import boto3

    s3 = boto3.client("s3")
    bucket, key = prefix.split("/", 1)
    try:
        s3.create_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - already there
        pass
    for rel, data in objects.items():
        s3.put_object(Bucket=bucket, Key=f"{key}/{rel}", Body=data)
    s3.put_object(Bucket=bucket, Key=f"{key}/{MANIFEST}", Body=json.dumps(manifest).encode())


def _manifest(files: dict[str, bytes], digest: str | None = None) -> dict:
    import hashlib

    listed = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for rel, d in files.items()}
    return {"format": "pqflow-artifact/1", "stage": "x", "params": {}, "inputs": {}, "fingerprint": "f",
            "files": listed, "digest": digest if digest is not None else canonical_digest(listed)}


def test_s3_manifest_digest_cannot_name_a_folder_to_delete(s3_env, tmp_path):
    """A manifest digest of '../../victim' would rmtree the victim folder and replace it."""
    victim = _user_folder(tmp_path / "victim")
    files = {"w.bin": b"weights"}
    for bad in (str(victim), "../../victim", "../" * 12 + str(victim).lstrip("/")):
        _put_s3_artifact("hostile/digest", _manifest(files, digest=bad), files)
        with pytest.raises(ArtifactError, match="digest"):
            open_artifact("s3://hostile/digest")
    assert _intact(victim)


def test_s3_file_names_cannot_escape_the_cache(s3_env, tmp_path):
    """A listed file '../../x' would be downloaded outside the cache folder."""
    cache = Path(os.environ["PQFLOW_CACHE_DIR"])
    for bad in ("../../escaped.txt", "/tmp/escaped-abs.txt", "a/../../escaped.txt", "a\\..\\x"):
        files = {bad: b"payload"}
        _put_s3_artifact("hostile/names", _manifest(files), {"ok.bin": b"payload"})
        with pytest.raises(ArtifactError, match="plain relative path"):
            open_artifact("s3://hostile/names")
    assert not (cache.parent / "escaped.txt").exists() and not Path("/tmp/escaped-abs.txt").exists()


def test_s3_cache_folder_is_named_by_the_recomputed_digest(s3_env):
    """The cache path derives from the digest pqflow computes, not from the manifest's word."""
    files = {"w.bin": b"weights"}
    m = _manifest(files)
    _put_s3_artifact("hostile/good", m, files)
    art = open_artifact("s3://hostile/good")
    assert art.path.name == canonical_digest(m["files"])
    assert art.path.parent == Path(os.environ["PQFLOW_CACHE_DIR"])


# -- 2. --out never deletes what pqflow did not write ---------------------------------------------

def test_out_refuses_a_folder_of_user_files(tmp_path, capsys):
    """`pqflow stage calibrate --out file://<user folder>` removed the user's files and exited 0."""
    user = _user_folder(tmp_path / "mine")
    rc = main(["stage", "calibrate", "--recipe", str(TINY), "--out", f"file://{user}"])
    assert rc == 2
    assert "not a pqflow artifact" in _one_error_line(capsys.readouterr().err)
    assert _intact(user) and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_out_refuses_the_working_directory(tmp_path, capsys, monkeypatch):
    """`--out .` emptied the working directory."""
    cwd = _user_folder(tmp_path / "project")
    monkeypatch.chdir(cwd)
    for out in (".", "file://.", str(tmp_path)):
        assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", out]) == 2
        _one_error_line(capsys.readouterr().err)
    assert _intact(cwd)


def test_out_refuses_a_file(tmp_path, capsys):
    """An existing file as --out is not replaced."""
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(f)]) == 2
    assert "not a folder" in _one_error_line(capsys.readouterr().err)
    assert f.read_text() == "keep"


def test_out_refuses_its_own_input(tmp_path, capsys):
    """`--in model=X --out X` replaced the input model with metrics."""
    cal = tmp_path / "calib"
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(cal)]) == 0
    before = (cal / MANIFEST).read_text()
    capsys.readouterr()
    for out in (cal, cal / "sub", tmp_path):
        rc = main(["stage", "evaluate", "--recipe", str(TINY), "--in", f"model={cal}", "--out", str(out)])
        assert rc == 2
        assert "overlaps input 'model'" in _one_error_line(capsys.readouterr().err)
    assert (cal / MANIFEST).read_text() == before
    open_artifact(str(cal))


def test_out_replaces_its_own_earlier_artifact(tmp_path):
    """A pqflow artifact (even a corrupted one) or an empty folder may be replaced."""
    out = tmp_path / "calib"
    out.mkdir()
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(out)]) == 0
    listed = next(iter(json.loads((out / MANIFEST).read_text())["files"]))
    (out / listed).write_bytes(b"garbage")
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(out), "--force"]) == 0
    open_artifact(str(out))


# -- 3. verification has no holes -------------------------------------------------------------------

def test_unlisted_file_in_an_artifact_is_refused(tmp_path):
    """An extra *.safetensors beside the listed ones would override weights and count in bytes."""
    uri = str(tmp_path / "art")
    _make(uri, {"model.safetensors": b"listed"})
    (tmp_path / "art" / "model-00002.safetensors").write_bytes(b"injected")
    with pytest.raises(ArtifactError, match="model-00002.safetensors is not listed"):
        open_artifact(uri)


def test_manifest_entries_cannot_point_outside(tmp_path):
    """Listed names that are absolute or climb out with '../' are refused before anything is read."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    for bad in ("../secret.txt", str(secret), "sub/../../secret.txt", "./x"):
        art = tmp_path / "art"
        art.mkdir(exist_ok=True)
        m = _manifest({bad: b"outside"})
        (art / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match="plain relative path"):
            open_artifact(str(art))


def test_symlinks_in_an_artifact_are_refused(tmp_path):
    """A listed file that is a symlink (to a file outside) is not followed."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"weights")
    uri = str(tmp_path / "art")
    _make(uri, {"w.bin": b"weights"})
    (tmp_path / "art" / "w.bin").unlink()
    (tmp_path / "art" / "w.bin").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symlink"):
        open_artifact(uri)
    (tmp_path / "art" / "w.bin").unlink()
    (tmp_path / "art" / "w.bin").write_bytes(b"weights")
    open_artifact(uri)
    (tmp_path / "art" / "d").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="symlink"):
        open_artifact(uri)


def test_forged_digest_in_a_local_manifest_is_refused(tmp_path):
    """The manifest's digest is recomputed from its file list."""
    uri = str(tmp_path / "art")
    _make(uri, {"w.bin": b"weights"})
    m = json.loads((tmp_path / "art" / MANIFEST).read_text())
    m["digest"] = "0" * 64
    (tmp_path / "art" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="digest does not match"):
        open_artifact(uri)


# -- 6. failure is one line, and fast ---------------------------------------------------------------

@pytest.fixture
def hanging_endpoint():
    """A loopback server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def test_hanging_s3_endpoint_fails_within_a_minute(hanging_endpoint, monkeypatch):
    """A hanging S3 endpoint took 302 s to fail."""
    for k, v in {"AWS_ENDPOINT_URL": hanging_endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(PqflowError, match=hanging_endpoint):
        open_artifact("s3://bucket/art")
    assert time.monotonic() - t0 < 75


def test_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing an artifact ended in a traceback."""
    import pqflow.runner as runner

    def full(folder, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "windows.safetensors"))

    monkeypatch.setattr(runner, "build_manifest", full)
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(tmp_path / "calib")]) == 2
    assert "no space left on device" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_are_one_line_without_debug(tmp_path, capsys, monkeypatch):
    """Any failure that is not pqflow's own is still one line; --debug shows the traceback."""
    import pqflow.runner as runner

    def boom(*a, **kw):
        raise RuntimeError("CUDA error: device-side assert\nmore lines")

    monkeypatch.setattr(runner, "build_manifest", boom)
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(tmp_path / "c")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "RuntimeError: CUDA error: device-side assert" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "stage", "calibrate", "--recipe", str(TINY), "--out", str(tmp_path / "c")])


# -- 7. stale staging folders are cleaned ----------------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_folders_of_killed_stages_are_removed(tmp_path):
    """`.partial-*` folders of killed stages were never cleaned; live ones are kept."""
    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".art.partial-{dead}-0123abcd"
    stale_old = tmp_path / f".art.old-{dead}-0123abcd"
    running = tmp_path / f".art.partial-{live}-0123abcd"
    for d in (stale, stale_old, running):
        d.mkdir()
        (d / "half.safetensors").write_bytes(b"x" * 10)
    _make(str(tmp_path / "art"), {"a.bin": b"1"})
    assert not stale.exists() and not stale_old.exists() and running.exists()
