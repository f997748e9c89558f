"""What pqflow defends against: one test per attack or failure, each written to fail before its fix.

Read this file as the list. Sections follow the classes of docs/security.md:

1. artifacts cannot write or delete outside their place (manifest digests and names, the S3 mirror);
2. ``--out`` replaces only pqflow artifacts that are not inputs of the same step;
3. verification is complete: unlisted files, symlinks, escaping names, pickles, remote code, ``hf:``;
4. input is bounded in ``validate`` (alias bombs, counts, group sizes, huge configs);
5. the evaluation-leak guard compares files, not strings;
6. failure is one line and fast (hanging S3, MLflow gone, full disk, bad data, shared state folder);
7. shutdown leaks nothing (kill -9, dead MLflow workers, stale staging folders).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from pqflow import services
from pqflow.artifacts import (
    MANIFEST,
    build_manifest,
    canonical_digest,
    open_artifact,
    publish,
    staging_dir,
)
from pqflow.cli import main
from pqflow.errors import ArtifactError, PqflowError, RecipeError, SourceError
from pqflow.models import load_model_artifact, load_source, save_model, weight_bytes
from pqflow.recipe import load_recipe, parse_recipe

from .conftest import RECIPES

# ==================================================================================================
# Items 1-3, 6, 7: artifacts, outputs, one-line failures, stale staging
# ==================================================================================================
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
    import pqflow.artifacts as artifacts

    def full(folder, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "windows.safetensors"))

    monkeypatch.setattr(artifacts, "build_manifest", full)
    assert main(["stage", "calibrate", "--recipe", str(TINY), "--out", str(tmp_path / "calib")]) == 2
    assert "no space left on device" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_are_one_line_without_debug(tmp_path, capsys, monkeypatch):
    """Any failure that is not pqflow's own is still one line; --debug shows the traceback."""
    import pqflow.artifacts as artifacts

    def boom(*a, **kw):
        raise RuntimeError("CUDA error: device-side assert\nmore lines")

    monkeypatch.setattr(artifacts, "build_manifest", boom)
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


# ==================================================================================================
# Item 3 and 4: model folders (pickle, remote code, hf: verification, unlisted weights, huge configs)
# ==================================================================================================
HUGE = {"hidden_size": 10**6, "intermediate_size": 10**6, "num_hidden_layers": 1000,
        "num_attention_heads": 1000, "num_key_value_heads": 1000, "head_dim": 1000}
# Fits in memory (~100 M params) but not in the ~2 MB of weights the tiny model stores.
INFLATED = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128}


def _publish(work: Path, dest: Path) -> Path:
    publish(work, str(dest), build_manifest(work, stage="test", params={}, inputs={}, fingerprint="fp"))
    return dest


def _artifact(tiny, tmp_path: Path, edit=None, name: str = "art", **save_kw) -> Path:
    model, tok = tiny
    dest = tmp_path / name
    work = staging_dir(str(dest))
    save_model(model, tok, work, **save_kw)
    if edit is not None:
        edit(work)
    return _publish(work, dest)


def _plain(tiny, folder: Path) -> Path:
    model, tok = tiny
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _to_pickle(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _pruned(tiny):
    """The tiny model with layer 1's MLP cut to 192 channels: uneven layers, format pqflow-pruned."""
    from pqflow.methods.prune.surgery import sync_config

    model, tok = tiny
    mlp = model.model.layers[1].mlp
    for nm in ("gate_proj", "up_proj"):
        new = nn.Linear(128, 192, bias=False)
        new.weight.data = getattr(mlp, nm).weight.data[:192].clone()
        setattr(mlp, nm, new)
    down = nn.Linear(192, 128, bias=False)
    down.weight.data = mlp.down_proj.weight.data[:, :192].clone()
    mlp.down_proj = down
    assert not sync_config(model)
    return model, tok


# -- pickle ------------------------------------------------------------------------------------

def test_pickle_only_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: a verified artifact whose only weights are a pickle pytorch_model.bin."""
    art = _artifact(tiny, tmp_path, _to_pickle)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_model_artifact(open_artifact(str(art)).path)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_source(f"hf:{art}")


def test_pickle_only_hf_folder_is_rejected(tiny, tmp_path: Path):
    """Attack: a plain hf: folder whose only weights are a pickle pytorch_model.bin."""
    folder = _plain(tiny, tmp_path / "plain")
    _to_pickle(folder)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_source(f"hf:{folder}")


# -- remote code -------------------------------------------------------------------------------

_EVIL_CONFIG = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "pqflow-evil"
"""
_EVIL_MODEL = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _make_evil(folder: Path) -> None:
    (folder / "configuration_evil.py").write_text(_EVIL_CONFIG)
    (folder / "modeling_evil.py").write_text(_EVIL_MODEL)
    _edit_config(folder, model_type="pqflow-evil", architectures=["EvilForCausalLM"],
                 auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


_EVIL_TOKENIZER = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _make_evil_tokenizer(folder: Path) -> None:
    (folder / "tokenization_evil.py").write_text(_EVIL_TOKENIZER)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _evil_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
            "PQFLOW_EVIL_MARK": str(tmp_path / "mark")}


@pytest.mark.parametrize("where,stdin", [("config", "pipe-yes"), ("config", "tty-yes"), ("config", "closed"),
                                         ("tokenizer", "pipe-yes")])
def test_remote_code_is_refused_without_prompting(tiny, tmp_path: Path, where: str, stdin: str):
    """Attack: a hf: folder whose config.json (or tokenizer_config.json) has auto_map to its own code, 'y' typed."""
    folder = _plain(tiny, tmp_path / "evil")
    (_make_evil if where == "config" else _make_evil_tokenizer)(folder)
    code = "import sys; from pqflow.models import load_source; load_source('hf:' + sys.argv[1])"
    cmd = [sys.executable, "-c", code, str(folder)]
    env = _evil_env(tmp_path)
    if stdin == "tty-yes":
        master, slave = pty.openpty()
        os.write(master, b"y\n")
        proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        os.close(slave)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            os.close(master)
        rc = proc.returncode
    else:
        r = subprocess.run(cmd, input="y\n" if stdin == "pipe-yes" else None,
                           stdin=subprocess.DEVNULL if stdin == "closed" else None,
                           capture_output=True, text=True, env=env, timeout=120)
        out, err, rc = r.stdout, r.stderr, r.returncode
    assert not (tmp_path / "mark").exists(), "the model's custom code was executed"
    assert rc != 0
    assert "Do you wish to run" not in out + err
    assert "SourceError" in err and "custom code" in err


def test_remote_code_in_artifact_is_refused(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Attack: a verified hf-format artifact whose config.json asks for its own modeling code."""
    monkeypatch.setenv("PQFLOW_EVIL_MARK", str(tmp_path / "mark"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    art = _artifact(tiny, tmp_path, _make_evil)
    with pytest.raises(SourceError, match="custom code"):
        load_model_artifact(open_artifact(str(art)).path)
    assert not (tmp_path / "mark").exists()


# -- hf: on pqflow artifact folders --------------------------------------------------------------

def test_hf_source_on_tampered_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: hf:<pqflow artifact> whose listed weights were changed after publishing."""
    art = _artifact(tiny, tmp_path)
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors is corrupted"):
        load_source(f"hf:{art}")


def test_hf_source_on_artifact_without_manifest_is_rejected(tiny, tmp_path: Path):
    """Attack: hf:<folder with pqflow_model.json but no manifest.json> skipping verification."""
    model, tok = tiny
    folder = save_model(model, tok, tmp_path / "m")
    with pytest.raises(SourceError, match="not a verified pqflow artifact"):
        load_source(f"hf:{folder}")


def test_hf_source_on_verified_artifact_and_plain_folder_still_load(tiny, tmp_path: Path):
    """Attack: none (the defences must keep verified artifacts and plain safetensors folders loading)."""
    model, _ = tiny
    ids = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for src in (_artifact(tiny, tmp_path), _plain(tiny, tmp_path / "plain")):
        with torch.no_grad():
            assert torch.equal(load_source(f"hf:{src}").model(input_ids=ids).logits, ref)


# -- absurd configs ------------------------------------------------------------------------------

def _save_quant(model, tok, out):
    from pqflow.quant.model import save_quantized

    return save_quantized(model, tok, out)


def _huge_target(kind: str, tiny, tmp_path: Path, dims: dict):
    """(callable that loads it) for a folder of the given kind whose config.json carries ``dims``."""
    if kind == "plain":
        folder = _plain(tiny, tmp_path / "plain")
        _edit_config(folder, **dims)
        return lambda: load_source(f"hf:{folder}")
    if kind == "pqflow-pruned":
        tiny = _pruned(tiny)
        kw = {"fmt": "pqflow-pruned"}
    elif kind == "pqflow-quant":
        kw = {"fmt": "pqflow-quant", "saver": _save_quant}
    else:
        kw = {}
    art = _artifact(tiny, tmp_path, lambda w: _edit_config(w, **dims), **kw)
    return lambda: load_source(f"hf:{art}")


@pytest.mark.parametrize("kind", ["plain", "hf", "pqflow-pruned", "pqflow-quant"])
def test_huge_dims_config_is_rejected_before_allocating(tiny, tmp_path: Path, kind: str):
    """Attack: config.json claiming hidden_size 10**6 x 1000 layers (petabytes) to exhaust memory."""
    load = _huge_target(kind, tiny, tmp_path, HUGE)
    rss = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"hidden_size=1000000.*num_hidden_layers=1000.*memory"):
        load()
    assert time.monotonic() - t0 < 60
    assert psutil.Process().memory_info().rss - rss < 2**30


@pytest.mark.parametrize("kind", ["hf", "pqflow-pruned", "pqflow-quant"])
def test_config_inconsistent_with_weight_bytes_is_rejected(tiny, tmp_path: Path, kind: str):
    """Attack: artifact config.json claiming ~100 M params beside ~2 MB of weights (memory that fits)."""
    load = _huge_target(kind, tiny, tmp_path, INFLATED)
    with pytest.raises(SourceError, match=r"hidden_size=1024.*weight files"):
        load()


@pytest.mark.parametrize("field,value", [("hidden_size", -128), ("hidden_size", 2**21),
                                         ("num_hidden_layers", 0), ("vocab_size", "320")])
def test_absurd_dims_are_rejected(tiny, tmp_path: Path, field: str, value):
    """Attack: config.json with non-positive, non-integer or absurd dimensions."""
    folder = _plain(tiny, tmp_path / "plain")
    _edit_config(folder, **{field: value})
    with pytest.raises(SourceError, match=field):
        load_source(f"hf:{folder}")


# -- unlisted files ----------------------------------------------------------------------------

def test_unlisted_safetensors_is_not_read_by_pruned_loader(tiny, tmp_path: Path):
    """Attack: an extra unlisted *.safetensors dropped into a published pruned artifact to override weights."""
    from pqflow.methods.prune.format import load_pruned_folder

    model, tok = _pruned(tiny)
    art = _artifact((model, tok), tmp_path, fmt="pqflow-pruned")
    listed = weight_bytes(art)
    ref = model.model.embed_tokens.weight.detach().clone()
    save_file({"model.embed_tokens.weight": torch.zeros_like(ref)}, str(art / "zz-override.safetensors"))
    loaded = load_pruned_folder(art, json.loads((art / "pqflow_model.json").read_text()))
    assert torch.equal(loaded.model.model.embed_tokens.weight, ref)
    assert weight_bytes(art) == listed


# -- LoRA adapters -----------------------------------------------------------------------------

def _lora_artifact(tiny, tmp_path: Path, adapter: str, pickle_adapter: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model

    from pqflow.formats.lora import save_adapter

    model, tok = tiny
    base_meta = {"format": "hf"}

    def saver(m, t, out):
        m.save_pretrained(out)
        t.save_pretrained(out)
        peft_model = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        where = out / adapter
        save_adapter(peft_model, where)
        if pickle_adapter:
            f = where / "adapter_model.safetensors"
            torch.save(load_file(f), where / "adapter_model.bin")
            f.unlink()
        return {"base": base_meta, "adapter": adapter, "merged": False}

    dest = tmp_path / "lora"
    work = staging_dir(str(dest))
    save_model(model, tok, work, fmt="pqflow-lora", saver=saver)
    return _publish(work, dest)


def test_lora_adapter_path_escaping_the_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: pqflow_model.json's 'adapter' pointing outside the verified folder (../)."""
    art = _lora_artifact(tiny, tmp_path, "adapter")
    outside = tmp_path / "outside"
    (art / "adapter").rename(outside)  # an unverified adapter beside the artifact
    meta = json.loads((art / "pqflow_model.json").read_text())
    meta["adapter"] = "../outside"
    from pqflow.formats import lora

    with pytest.raises(SourceError, match="adapter"):
        lora.load(art, meta)


def test_pickle_lora_adapter_is_rejected(tiny, tmp_path: Path):
    """Attack: a LoRA artifact whose adapter weights are a pickle adapter_model.bin."""
    art = _lora_artifact(tiny, tmp_path, "adapter", pickle_adapter=True)
    with pytest.raises(SourceError, match=r"adapter_model\.safetensors"):
        load_model_artifact(open_artifact(str(art)).path)


# ==================================================================================================
# Items 4, 5, 6: recipes, limits, the evaluation-leak guard, data files
# ==================================================================================================
ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _tiny() -> dict:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _one_line_cli_error(capsys, argv: list[str], progress: bool = False) -> str:
    """The error line of a failed CLI call; ``progress``: other ``[pqflow]`` lines may come first."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if progress:
        lines = [ln for ln in lines if not ln.startswith("[pqflow] ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("pqflow: error: ")
    return lines[0]


def _bomb_recipe(tmp_path: Path) -> Path:
    """tiny.yaml with a billion-laughs alias bomb in the (disabled) prune stage's params."""
    body = (RECIPES / "tiny.yaml").read_text()
    bomb = "\n".join("      " + ln for ln in ALIAS_BOMB.splitlines())
    body = body.replace("stages:\n", f"stages:\n  prune:\n    enabled: false\n    params:\n{bomb}\n", 1)
    p = tmp_path / "bomb.yaml"
    p.write_text(body)
    return p


# -- A. unbounded input ------------------------------------------------------------------------


def test_alias_bomb_in_disabled_stage_rejected_at_load(tmp_path: Path):
    """Attack: YAML alias bomb (billion laughs) inside a disabled stage's params."""
    p = _bomb_recipe(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="alias") as e:
        load_recipe(p)
    assert time.perf_counter() - t0 < 30
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_alias_bomb_cli_is_one_line(tmp_path: Path, capsys):
    """Attack: alias bomb given to `pqflow validate`."""
    line = _one_line_cli_error(capsys, ["validate", str(_bomb_recipe(tmp_path))])
    assert "alias" in line


def test_recursive_alias_rejected(tmp_path: Path):
    """Attack: a self-referencing YAML alias (a cyclic recipe that cannot be serialised)."""
    p = tmp_path / "cycle.yaml"
    body = (RECIPES / "tiny.yaml").read_text()
    p.write_text(body.replace("stages:\n", "stages:\n  prune:\n    params:\n      x: &d [*d]\n", 1))
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(p)


def test_deeply_nested_yaml_is_one_recipe_error(tmp_path: Path):
    """Attack: YAML nested 100k levels deep (RecursionError in the YAML composer)."""
    p = tmp_path / "deep.yaml"
    p.write_text("name: x\ndescription: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match="deep"):
        load_recipe(p)


def test_oversized_recipe_file_rejected(tmp_path: Path):
    """Attack: a multi-megabyte recipe file."""
    p = tmp_path / "big.yaml"
    p.write_text((RECIPES / "tiny.yaml").read_text() + "description: '" + "x" * (3 << 20) + "'\n")
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(p)


def test_non_utf8_recipe_and_directory_recipe(tmp_path: Path, capsys):
    """Attack: a recipe that is binary, and a recipe path that is a directory."""
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    assert "UTF-8" in _one_line_cli_error(capsys, ["validate", str(p)])
    assert "directory" in _one_line_cli_error(capsys, ["validate", str(tmp_path)])


def test_bad_data_fails_validate_and_run_before_anything_starts(tmp_path: Path, capsys):
    """Attack: a non-UTF-8 data file passed validate, and `pqflow run` started services before failing."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not text\n" * 10)
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": f"text:{bad}"}
    recipe = _write(tmp_path, data)
    for argv in (["validate", str(recipe)],
                 ["run", str(recipe), "--root", f"file://{tmp_path / 'art'}", "--state-dir", str(tmp_path / "st")]):
        assert "not UTF-8" in _one_line_cli_error(capsys, argv)
    assert not (tmp_path / "art").exists() and not (tmp_path / "st").exists()


def test_huge_integer_literal_is_a_recipe_error(tmp_path: Path):
    """Attack: an integer literal with 10k digits (Python refuses to convert it)."""
    data = (RECIPES / "tiny.yaml").read_text().replace("n_windows: 8", "n_windows: " + "9" * 10_000)
    p = tmp_path / "digits.yaml"
    p.write_text(data)
    with pytest.raises(RecipeError):
        load_recipe(p)


def test_billion_windows_rejected_at_validate(tmp_path: Path, capsys):
    """Attack: n_windows: 1000000000 (allocated gigabytes before failing)."""
    data = _tiny()
    data["stages"]["calibrate"]["n_windows"] = 1_000_000_000
    with pytest.raises(RecipeError, match="stages.calibrate.n_windows"):
        parse_recipe(data)
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    assert "stages.calibrate.n_windows" in line


def test_window_token_product_is_bounded():
    """Attack: each count within its bound, their product (tokens held in memory) not."""
    data = _tiny()
    data["stages"]["calibrate"].update(n_windows=60_000, seqlen=100_000)
    with pytest.raises(RecipeError, match="stages.calibrate"):
        parse_recipe(data)


@pytest.mark.parametrize("stage,key,value", [
    ("evaluate", "seqlen", 10**12),
    ("evaluate", "batch_size", 10**9),
    ("bit_search", "heldout_windows", 10**9),
    ("bit_search", "cache_mb", 10**12),
    ("calibrate", "seed", -1),
])
def test_stage_counts_are_bounded(stage: str, key: str, value: int):
    """Attack: absurd counts/sizes in stage fields."""
    data = _tiny()
    data["stages"].setdefault(stage, {})[key] = value
    with pytest.raises(RecipeError, match=f"stages.{stage}.{key}"):
        parse_recipe(data)


def test_method_param_counts_are_bounded():
    """Attack: n_windows: 1e9 inside a method's params."""
    data = _tiny()
    data["stages"]["quantize"] = {"enabled": True, "method": "gptq", "params": {"n_windows": 10**9}}
    with pytest.raises(RecipeError, match="stages.quantize.params.n_windows"):
        parse_recipe(data)
    data["stages"]["quantize"] = {"enabled": True, "method": "mrem", "params": {"gptq": {"batch_size": 10**9}}}
    with pytest.raises(RecipeError, match="stages.quantize.params.gptq.batch_size"):
        parse_recipe(data)


def test_group_size_zero_rejected(capsys, tmp_path: Path):
    """Attack: group_size: 0 passed validate and failed later with a traceback."""
    data = _tiny()
    data["stages"]["quantize"] = {"enabled": True, "group_size": 0}
    with pytest.raises(RecipeError, match="stages.quantize.group_size"):
        parse_recipe(data)
    assert "stages.quantize.group_size" in _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    data["stages"]["quantize"] = {"group_size": -64}
    with pytest.raises(RecipeError, match="stages.quantize.group_size"):
        parse_recipe(data)
    data["stages"]["quantize"] = {"enabled": False}
    data["stages"]["finetune"] = {"enabled": True, "params": {"init": "loftq", "loftq_group_size": 0}}
    with pytest.raises(RecipeError, match="stages.finetune.params.loftq_group_size"):
        parse_recipe(data)


def test_non_finite_numbers_rejected():
    """Attack: .nan / .inf where a number is expected."""
    data = _tiny()
    data["tracking"] = {"gate": {"max_ppl_increase": float("inf")}}
    with pytest.raises(RecipeError, match="tracking.gate.max_ppl_increase"):
        parse_recipe(data)
    data = _tiny()
    data["stages"]["bit_search"] = {"params": {"alpha_range": [0.0, float("nan")]}, "method": "nevergrad-prior"}
    with pytest.raises(RecipeError, match="stages.bit_search.params.alpha_range"):
        parse_recipe(data)


def test_bad_params_in_disabled_stage_rejected(tmp_path: Path, capsys):
    """Attack: size limits skipped for a disabled stage's params (checked only when enabled)."""
    data = _tiny()
    data["stages"]["prune"] = {"enabled": False, "params": {"correct_windows": 10**9}}
    with pytest.raises(RecipeError, match="stages.prune.params.correct_windows"):
        parse_recipe(data)
    data["stages"]["prune"] = {"enabled": False, "params": {"no_such_knob": 1}}
    with pytest.raises(RecipeError, match="stages.prune.params.no_such_knob"):
        parse_recipe(data)
    data["stages"]["prune"] = {"enabled": False, "method": "no-such-method"}
    with pytest.raises(RecipeError, match="stages.prune.method"):
        parse_recipe(data)
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    assert "stages.prune.method" in line


def test_disabled_stages_with_defaults_still_validate():
    """Regression guard: disabling stages with their default method and params stays valid."""
    data = _tiny()
    for s in ("importance", "prune", "bit_search", "quantize", "finetune"):
        data["stages"][s] = {"enabled": False}
    parse_recipe(data)
    for path in RECIPES.glob("*.yaml"):
        load_recipe(path)


def test_overlong_strings_rejected():
    """Attack: a 100k-character run name (used as a folder name)."""
    data = _tiny()
    data["name"] = "a" * 100_000
    with pytest.raises(RecipeError, match="name"):
        parse_recipe(data)


# -- B. evaluation-leak guard -------------------------------------------------------------------


def _leak_recipe(cal: str, ev: str) -> dict:
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": cal}
    data["stages"]["evaluate"]["data"] = {"source": ev}
    return data


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "f.txt"
    f.write_text("".join(f"line {i} of the evaluation text\n" for i in range(200)))
    return f


def test_leak_guard_dotdot_path(text_file: Path):
    """Attack: calibration on text:d/../d/f.txt while evaluating on text:d/f.txt."""
    dotdot = text_file.parent / ".." / text_file.parent.name / text_file.name
    with pytest.raises(RecipeError, match="evaluation") as e:
        parse_recipe(_leak_recipe(f"text:{dotdot}", f"text:{text_file}"))
    assert str(text_file) in str(e.value)


def test_leak_guard_dotdot_path_of_missing_file(tmp_path: Path):
    """Attack: the `../` spelling when the files do not exist yet (validate before the data is there)."""
    f = tmp_path / "later" / "f.txt"
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{tmp_path}/later/../later/f.txt", f"text:{f}"))


def test_leak_guard_symlink(text_file: Path):
    """Attack: calibration on a symlink to the evaluation file."""
    link = text_file.parent / "link.txt"
    link.symlink_to(text_file)
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{link}", f"text:{text_file}"))


def test_leak_guard_hardlink(text_file: Path):
    """Attack: calibration on a hard link to the evaluation file."""
    link = text_file.parent / "hard.txt"
    os.link(text_file, link)
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{link}", f"text:{text_file}"))


def test_leak_guard_jsonl_vs_text_same_file(text_file: Path):
    """Attack: jsonl: and text: of the same file."""
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"jsonl:{text_file}", f"text:{text_file}"))


def test_leak_guard_copied_file(text_file: Path, tmp_path: Path):
    """Attack: calibration on a byte-identical copy of the evaluation file."""
    copy = tmp_path / "copy.txt"
    shutil.copyfile(text_file, copy)
    with pytest.raises(RecipeError, match="evaluation") as e:
        parse_recipe(_leak_recipe(f"text:{copy}", f"text:{text_file}"))
    assert str(copy) in str(e.value) and str(text_file) in str(e.value)


def test_leak_guard_wikitext_test_file(data_dir: Path):
    """Attack: calibration on text: of WikiText-2's own test file while evaluating on wikitext2."""
    test_raw = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{test_raw}", "wikitext2"))


def test_leak_guard_finetune_data(text_file: Path, tmp_path: Path):
    """Attack: fine-tuning on (a copy of) the evaluation data."""
    copy = tmp_path / "copy.txt"
    shutil.copyfile(text_file, copy)
    data = _tiny()
    data["stages"]["evaluate"]["data"] = {"source": f"text:{text_file}"}
    data["stages"]["finetune"] = {"enabled": True, "data": {"source": f"jsonl:{copy}"}}
    with pytest.raises(RecipeError, match="stages.finetune.data"):
        parse_recipe(data)


def test_leak_guard_cli_is_one_line(text_file: Path, tmp_path: Path, capsys):
    """Attack: the `../` leak through `pqflow validate`."""
    dotdot = text_file.parent / ".." / text_file.parent.name / text_file.name
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, _leak_recipe(f"text:{dotdot}",
                                                                                       f"text:{text_file}")))])
    assert "evaluation" in line


def test_distinct_files_still_accepted(text_file: Path, tmp_path: Path):
    """Regression guard: different local files for calibration and evaluation stay valid."""
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 100)
    parse_recipe(_leak_recipe(f"text:{other}", f"text:{text_file}"))
    parse_recipe(_leak_recipe("wikitext2", "wikitext2"))


def test_leak_guard_at_load_time(text_file: Path, tmp_path: Path):
    """Attack: the calibration file is created as a copy of the evaluation file after validation."""
    from pqflow.stages import calibrate

    copy = tmp_path / "later.txt"
    recipe = parse_recipe(_leak_recipe(f"text:{copy}", f"text:{text_file}"))  # copy absent: valid
    shutil.copyfile(text_file, copy)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match="evaluation") as e:
        calibrate.run(recipe, {}, out)
    assert str(copy) in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []


# -- C. data errors -----------------------------------------------------------------------------


def test_non_utf8_data_names_file_and_offset(tmp_path: Path):
    """Attack: a data file that is not UTF-8."""
    from pqflow.data import load_text

    p = tmp_path / "bin.txt"
    p.write_bytes(b"hello world\n" * 10 + b"\xff\xfe rest\n")
    with pytest.raises(SourceError) as e:
        load_text(f"text:{p}", "test")
    msg = str(e.value)
    assert str(p) in msg and "UTF-8" in msg and "120" in msg and "\n" not in msg


def test_directory_as_data_file(tmp_path: Path):
    """Attack: a directory given as a text: file (was reported as 'not found')."""
    from pqflow.data import load_text

    with pytest.raises(SourceError, match="directory") as e:
        load_text(f"jsonl:{tmp_path}", "test")
    assert "not found" not in str(e.value)


def test_device_as_data_file():
    """Attack: a character device (endless /dev/zero) given as a text: file."""
    from pqflow.data import load_text

    with pytest.raises(SourceError, match="regular file"):
        load_text("text:/dev/zero", "test")


def test_unreadable_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Attack: a data file without read permission."""
    from pqflow.data import load_text

    p = tmp_path / "secret.txt"
    p.write_text("text\n")
    real_open = open

    def deny(file, *args, **kwargs):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(SourceError, match="Permission denied") as e:
        load_text(f"text:{p}", "test")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_empty_data_file_and_empty_split(tmp_path: Path):
    """Attack: an empty file, and a file too short to have a train split."""
    from pqflow.data import load_text

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SourceError, match="empty"):
        load_text(f"text:{empty}", "test")
    short = tmp_path / "short.txt"
    short.write_text("one line only\n")
    with pytest.raises(SourceError, match="train"):
        load_text(f"text:{short}", "train")


def test_data_errors_through_cli_are_one_line(tmp_path: Path, capsys):
    """Attack: non-UTF-8 calibration data through `pqflow stage calibrate`."""
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff" * 100)
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": f"text:{bad}"}
    p = _write(tmp_path, data)
    line = _one_line_cli_error(capsys, ["stage", "calibrate", "--recipe", str(p), "--out", str(tmp_path / "o")],
                               progress=True)
    assert str(bad) in line and "UTF-8" in line


def test_deeply_nested_jsonl_line(tmp_path: Path):
    """Attack: a jsonl line nested 100k levels deep (RecursionError in the JSON decoder)."""
    from pqflow.data import load_text

    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SourceError, match=r"deep.jsonl:2: not valid JSON"):
        load_text(f"jsonl:{p}", "test")


def test_bit_choice_group_is_bounded():
    """Attack: a bit choice with an absurd group size ('4g99999999999')."""
    data = _tiny()
    data["stages"]["bit_search"] = {"choices": ["4g64", "4g99999999999"]}
    with pytest.raises(RecipeError, match="stages.bit_search.choices"):
        parse_recipe(data)


# ==================================================================================================
# Items 1, 6, 7: embedded services, the S3 mirror, MLflow failures, shutdown
# ==================================================================================================
# Starts services in a child process, prints what it got, keeps them until stdin closes.
HOLDER = """
import json, sys
from pqflow import services
svc = services.start(sys.argv[1], mlflow=sys.argv[2] == "1")
print(json.dumps({"owned": svc.owned, "s3": svc.s3_url, "mlflow": svc.mlflow_url, "pids": svc.pids}), flush=True)
sys.stdin.read()
svc.stop()
"""


def _holder(state: Path, mlflow: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(state), "1" if mlflow else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, f"service holder exited with {proc.wait()}"
    return json.loads(line)


def _leftovers(state: Path, pgids: list[int]) -> list[str]:
    """Processes that belong to the services of ``state`` (by process group, cwd or command line)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            pgid = os.getpgid(p.pid)
        except OSError:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if pgid in pgids or str(state) in cmd or p.info["cwd"] == str(state):
            out.append(f"{p.pid} {cmd[:120]}")
    return out


def _wait_gone(state: Path, pgids: list[int], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while (left := _leftovers(state, pgids)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _bucket() -> str:
    return f"hostile-{uuid.uuid4().hex[:12]}"


def test_snapshot_refuses_object_keys_that_escape_the_mirror(s3_server, tmp_path):
    """Attack: an S3 object key with ../ (or a forged mirror index) writes or deletes outside <state>/s3."""
    state = tmp_path / "a" / "b" / "state"
    state.mkdir(parents=True)
    victim = tmp_path / "a" / "victim.txt"
    victim.write_text("keep me")
    s3 = services._client(s3_server)
    bucket = _bucket()
    s3.create_bucket(Bucket=bucket)
    for key in ("../../evil", "../../../evil2", "/abs/evil3", "ok/file.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"payload")
    # a forged index makes the snapshot "delete" an object that is gone from S3
    (state / services.INDEX).write_text(json.dumps({"../../../victim.txt": "x:1", f"{bucket}/../../../../victim.txt": "x:1"}))
    services.snapshot_s3(s3_server, state)
    assert (state / "s3" / bucket / "ok" / "file.txt").read_bytes() == b"payload"
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    outside = {p for p in written if state / "s3" not in p.parents and p.parent != state}
    assert outside == {victim}, outside
    assert victim.read_text() == "keep me"
    assert not list(state.glob("evil*"))


def test_restore_uploads_only_regular_files_inside_the_mirror(s3_server, tmp_path):
    """Attack: symlinks planted in <state>/s3 make the restore upload files from elsewhere on disk."""
    state = tmp_path / "state"
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "id_rsa").write_text("PRIVATE")
    bucket, linked_bucket = _bucket(), _bucket()
    bdir = state / "s3" / bucket
    bdir.mkdir(parents=True)
    (bdir / "ok.txt").write_text("fine")
    (bdir / "link.txt").symlink_to(secret_dir / "id_rsa")
    (bdir / "linkdir").symlink_to(secret_dir, target_is_directory=True)
    (state / "s3" / linked_bucket).symlink_to(secret_dir, target_is_directory=True)
    services.restore_s3(s3_server, state)
    s3 = services._client(s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["ok.txt"]
    assert linked_bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def _hanging_server() -> tuple[str, socket.socket]:
    """A loopback socket that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", srv


def test_hanging_endpoint_of_the_embedded_services_fails_within_a_minute(monkeypatch):
    """Attack: an S3 endpoint that accepts connections and never answers stalls the run for minutes."""
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    url, srv = _hanging_server()
    t0 = time.monotonic()
    try:
        with pytest.raises(PqflowError) as e:
            services._ensure_bucket(url, "mlflow", embedded=False)
    finally:
        srv.close()
    took = time.monotonic() - t0
    assert url in str(e.value) and "\n" not in str(e.value)
    assert took < 90, took


def test_unsupported_tracking_uri_scheme_is_one_error():
    """Attack: a tracking URI with a scheme MLflow cannot use ends in a traceback instead of one line."""
    from pqflow import tracking

    for uri in ("ftp://host/mlruns", "gopher://x", "s3://bucket/mlruns"):
        with pytest.raises(PqflowError) as e:
            tracking.check_reachable(uri)
        msg = str(e.value)
        assert uri in msg and "http" in msg and "sqlite" in msg and "\n" not in msg
    tracking.check_reachable("sqlite:///tmp/x.db")  # stores that need no server pass
    tracking.check_reachable("file:///tmp/mlruns")


def test_mlflow_server_gone_mid_run_is_one_error(tiny_recipe, tmp_path, monkeypatch):
    """Attack: the MLflow server stops answering mid-run and the run ends in a traceback."""
    from pqflow import tracking
    from pqflow.runner import StageOutcome

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # keep the test fast
    uri = f"http://127.0.0.1:{services.free_port()}"  # nothing listens: the server "died"
    # mlflow.set_tracking_uri / set_registry_uri export these; setenv first so that monkeypatch
    # removes them afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = tracking.configure(uri)
    outcome = StageOutcome("calibrate", f"file://{tmp_path}/calibrate", {"summary": {"n": 1}}, False, 1.0)
    calls = {
        "start_parent": lambda: tracking.start_parent(client, tiny_recipe, "k", root=f"file://{tmp_path}",
                                                      steps=["calibrate"]),
        "end_parent": lambda: tracking.end_parent(client, "0" * 32, True, {"pipeline_seconds": 1.0}),
        "StageTracker": lambda: tracking.StageTracker(uri, tiny_recipe, f"file://{tmp_path}", "calibrate",
                                                      parent_run="0" * 32)(outcome),
    }
    for what, call in calls.items():
        with pytest.raises(PqflowError) as e:
            call()
        msg = str(e.value)
        assert f"MLflow tracking server {uri} stopped answering while" in msg, (what, msg)
        assert "\n" not in msg


def test_concurrent_starts_on_one_state_folder_share_one_service_set(tmp_path):
    """Attack: two runs sharing a state folder race to start a second MLflow on the same sqlite file."""
    state = tmp_path / "state"
    a, b = _holder(state, True), _holder(state, True)
    try:
        ra, rb = _ready(a), _ready(b)
        assert ra["mlflow"] == rb["mlflow"] and ra["s3"] == rb["s3"] and ra["pids"] == rb["pids"]
        assert sorted([ra["owned"], rb["owned"]]) == [False, True]
        owner, user = (a, b) if ra["owned"] else (b, a)
        pgids = list(ra["pids"].values())
        # The owner finishes first: the services stay up for the other run...
        owner.stdin.close()
        assert owner.wait(timeout=60) == 0
        with urllib.request.urlopen(ra["mlflow"] + "/health", timeout=10) as r:
            assert r.status == 200
        # ...and stop once it is done too.
        user.stdin.close()
        assert user.wait(timeout=60) == 0
        assert _wait_gone(state, pgids, 15) == []
        assert not (state / "services.json").exists()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()


def test_kill_9_of_the_owner_leaves_no_process_and_keeps_s3(tmp_path):
    """Attack: SIGKILL of the process that started the services leaks moto/MLflow/uvicorn and loses S3."""
    state = tmp_path / "state"
    proc = _holder(state, True)
    try:
        info = _ready(proc)
        s3 = services._client(info["s3"])
        s3.create_bucket(Bucket="keep")
        s3.put_object(Bucket="keep", Key="runs/metric.json", Body=b"{}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    left = _wait_gone(state, list(info["pids"].values()), 10)
    assert left == []
    assert (state / "s3" / "keep" / "runs" / "metric.json").read_bytes() == b"{}"
    assert services.running(state) is None


def test_stale_run_scratch_of_a_dead_process_is_removed(tiny_recipe, tmp_path, monkeypatch):
    """Attack: stages killed mid-run leave pqflow-run-* scratch folders in the temp dir forever."""
    from pqflow.local_run import run_plan

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp / f"pqflow-run-{dead.pid}-abc123"
    (stale / "calibrate").mkdir(parents=True)
    (stale / "calibrate" / "big.bin").write_bytes(b"0" * 1024)
    live = tmp / f"pqflow-run-{os.getpid()}-def456"  # a run of a process that still lives
    live.mkdir()
    run_plan(tiny_recipe, f"file://{tmp_path / 'art'}")
    assert not stale.exists()
    assert live.is_dir()
    assert [p for p in tmp.glob("pqflow-*")] == [live]  # this run's own scratch is gone too


def test_stop_kills_the_whole_group_when_its_leader_died(tmp_path):
    """Attack: the MLflow server process dies and stop() leaves its uvicorn/worker processes behind."""
    svc = services.Services(tmp_path)
    # a leader that exits at once, leaving a worker in its process group (as uvicorn's are)
    leader = svc._spawn("mlflow", [sys.executable, "-c", "import subprocess, sys; subprocess.Popen("
                                   "[sys.executable, '-c', 'import time; time.sleep(120)'])"], {})
    leader.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not (orphans := _leftovers(tmp_path, [leader.pid])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphans, "the worker did not start"
    try:
        svc.stop()
        assert _wait_gone(tmp_path, [leader.pid], 10) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


def test_next_start_cleans_up_after_an_owner_killed_with_its_watchdog(tmp_path):
    """Attack: owner and watchdog both SIGKILLed leave a stale services.json and running servers."""
    state = tmp_path / "state"
    proc = _holder(state, False)
    try:
        info = _ready(proc)
        s3 = services._client(info["s3"])
        s3.create_bucket(Bucket="keep")
        s3.put_object(Bucket="keep", Key="late.txt", Body=b"late")
        watchdog = json.loads((state / "services.json").read_text()).get("watchdog")
        if watchdog:
            os.kill(watchdog, signal.SIGKILL)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    pgids = list(info["pids"].values())
    try:
        assert services.running(state) is None
        assert _wait_gone(state, pgids, 10) == []
        assert not (state / "services.json").exists()
        assert (state / "s3" / "keep" / "late.txt").read_bytes() == b"late"
    finally:
        for g in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGKILL)


# ==================================================================================================
# Item 7: kill -9 of a tracked pqflow run
# ==================================================================================================
CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_DEFAULT_REGION", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")


def _recipe(tmp_path: Path) -> Path:
    r = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    r["name"] = "killed"
    r["stages"]["quantize"] = {"enabled": True, "method": "rtn", "bits": 4, "group_size": 32}
    p = tmp_path / "killed.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _pqflow(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return subprocess.Popen([sys.executable, "-m", "pqflow.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _weights(root: Path) -> dict[str, str]:
    q = root / "killed" / "quantize"
    listed = json.loads((q / "manifest.json").read_text())["files"]
    return {rel: hashlib.sha256((q / rel).read_bytes()).hexdigest() for rel in listed if rel.endswith(".safetensors")}


@pytest.mark.parametrize("kill_at", ["quantize: running"])
def test_kill_9_of_a_tracked_run_leaves_nothing_running_and_resumes(tmp_path, kill_at):
    """After kill -9 of `pqflow run`, its embedded moto and MLflow kept running."""
    recipe = _recipe(tmp_path)
    ref = _pqflow("run", str(recipe), "--root", f"file://{tmp_path / 'ref'}", "--no-tracking", cwd=tmp_path)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err

    args = ("run", str(recipe), "--root", f"file://{tmp_path / 'art'}", "--state-dir", str(tmp_path / "state"))
    run = _pqflow(*args, cwd=tmp_path)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = run.stderr.readline()
        if not line:
            break
        seen.append(line)
        if kill_at in line:
            break
    assert any(kill_at in ln for ln in seen), "".join(seen)
    family = psutil.Process(run.pid).children(recursive=True)
    assert family, "the run started no services"
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(0.2)
    left = [" ".join(p.cmdline()) for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running 10 s after kill -9: {left}"

    again = _pqflow(*args, cwd=tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "calibrate: up to date" in err
    assert _weights(tmp_path / "art") == _weights(tmp_path / "ref")
    assert not list((tmp_path / "art" / "killed").glob(".*partial-*"))
