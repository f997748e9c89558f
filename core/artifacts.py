"""Artifact store for ``file://`` (or plain path) and ``s3://`` URIs.

An artifact is a folder of files plus ``manifest.json`` (stage, params, input digests, sha256 of
every file, package versions). The manifest is written last: a folder without one is not an
artifact, and reading verifies every file's sha256. Publishing never leaves a half-written
artifact: local folders are renamed into place, S3 uploads are removed again on failure.
S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); botocore retries transient errors.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pqflow.errors import ArtifactError, PqflowError

MANIFEST = "manifest.json"
FORMAT = "pqflow-artifact/1"
CACHE_ENV = "PQFLOW_CACHE_DIR"
_VERSIONED = ("pqflow", "torch", "transformers", "safetensors", "peft", "bitsandbytes", "kfp", "mlflow")


@dataclass(frozen=True)
class Artifact:
    uri: str
    path: Path  # a verified local folder
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def canonical_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(folder: Path, *, stage: str, params: dict[str, Any], inputs: dict[str, Any],
                   fingerprint: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return {
        "format": FORMAT,
        "stage": stage,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params": params,
        "inputs": inputs,
        "fingerprint": fingerprint,
        "files": files,
        "digest": canonical_digest(files),
        "bytes": sum(f["bytes"] for f in files.values()),
        "versions": versions(),
        "summary": summary or {},
    }


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :]).expanduser().absolute()
    if "://" in uri:
        raise ArtifactError(f"unsupported artifact URI '{uri}' (use file:// or s3://)")
    return Path(uri).expanduser().absolute()


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise ArtifactError(f"{where}: not a pqflow manifest")
    return manifest


def _verify(folder: Path, manifest: dict[str, Any], uri: str) -> None:
    for rel, info in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise ArtifactError(f"artifact {uri}: file {rel} listed in the manifest is missing")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"artifact {uri}: file {rel} is corrupted (sha256 does not match the manifest)")


# -- S3 --------------------------------------------------------------------------------------------

def _s3():
    import boto3
    from botocore.config import Config

    # Bounded connect/read timeouts and botocore's standard retry mode (exponential backoff on
    # throttling, 5xx and connection errors): an unreachable endpoint fails in well under a minute.
    cfg = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"})
    return boto3.client("s3", config=cfg)


def _split_s3(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if not u.netloc:
        raise ArtifactError(f"bad S3 URI '{uri}': expected s3://bucket/prefix")
    return u.netloc, u.path.lstrip("/").rstrip("/")


@contextlib.contextmanager
def _s3_errors(uri: str, missing_ok: bool = False):
    """Turn botocore failures into one-line errors that name the URI or the endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {})
        if missing_ok and err.get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            raise _Missing() from None
        raise ArtifactError(f"S3 error on {uri}: {err.get('Code', '?')}: {err.get('Message', '')}") from None
    except BotoCoreError as e:
        raise PqflowError(f"S3 endpoint {_endpoint()} unreachable while accessing {uri}: {e}") from None


class _Missing(Exception):
    pass


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "(AWS default)"


def _s3_call(uri: str, fn, *args, **kw):
    with _s3_errors(uri):
        return fn(*args, **kw)


def _s3_get_manifest(uri: str) -> dict[str, Any] | None:
    bucket, prefix = _split_s3(uri)
    try:
        with _s3_errors(uri, missing_ok=True):
            body = _s3().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
    except _Missing:
        return None
    try:
        return _check_manifest(json.loads(body), f"{uri}/{MANIFEST}")
    except json.JSONDecodeError:
        raise ArtifactError(f"{uri}/{MANIFEST}: manifest is not valid JSON") from None


def _s3_publish(folder: Path, uri: str, manifest: dict[str, Any]) -> None:
    bucket, prefix = _split_s3(uri)
    s3 = _s3()
    # An older artifact at this prefix stops being valid before any of its files are replaced.
    _s3_call(uri, s3.delete_object, Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    uploaded: list[str] = []
    try:
        for rel in manifest["files"]:
            key = f"{prefix}/{rel}"
            _s3_call(uri, s3.upload_file, str(folder / rel), bucket, key)
            uploaded.append(key)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        _s3_call(uri, s3.put_object, Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=body)
    except BaseException:
        for key in uploaded:
            try:
                s3.delete_object(Bucket=bucket, Key=key)
            except Exception:  # noqa: BLE001 - best effort cleanup; the manifest is absent anyway
                pass
        raise


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "pqflow" / "artifacts"))


def _s3_fetch(uri: str, manifest: dict[str, Any]) -> Path:
    bucket, prefix = _split_s3(uri)
    dest = _cache_root() / manifest["digest"]
    if (dest / MANIFEST).is_file():
        try:
            _verify(dest, manifest, uri)
            return dest
        except ArtifactError:
            shutil.rmtree(dest, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        s3 = _s3()
        for rel in manifest["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _s3_call(uri, s3.download_file, bucket, f"{prefix}/{rel}", str(tmp / rel))
        _verify(tmp, manifest, uri)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- public API ------------------------------------------------------------------------------------

def read_manifest(uri: str) -> dict[str, Any] | None:
    """The artifact's manifest, or None when there is no artifact at ``uri``."""
    if is_s3(uri):
        return _s3_get_manifest(uri)
    p = local_path(uri) / MANIFEST
    if not p.is_file():
        return None
    try:
        return _check_manifest(json.loads(p.read_text()), str(p))
    except json.JSONDecodeError:
        raise ArtifactError(f"{p}: manifest is not valid JSON") from None


def open_artifact(uri: str) -> Artifact:
    """Resolve ``uri`` to a local folder whose every file matches its manifest."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise ArtifactError(f"no artifact at {uri}: {MANIFEST} is missing (never written, or the stage failed)")
    folder = _s3_fetch(uri, manifest) if is_s3(uri) else local_path(uri)
    if not is_s3(uri):
        _verify(folder, manifest, uri)
    return Artifact(uri, folder, manifest)


def staging_dir(uri: str) -> Path:
    """A fresh local folder to build an artifact in (beside the destination when it is local,
    so that publishing is one rename)."""
    if is_s3(uri):
        return Path(tempfile.mkdtemp(prefix="pqflow-stage-"))
    dest = local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(folder: Path, uri: str, manifest: dict[str, Any]) -> None:
    """Move a finished artifact folder to ``uri``; the manifest lands last."""
    if is_s3(uri):
        _s3_publish(folder, uri, manifest)
        shutil.rmtree(folder, ignore_errors=True)
        return
    dest = local_path(uri)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(folder, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, dest)


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def check_reachable(uri: str) -> None:
    """Fail fast, naming the endpoint, when an ``s3://`` root cannot be reached."""
    if not is_s3(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = _split_s3(uri)
    s3 = _s3()
    try:
        with _s3_errors(uri, missing_ok=True):
            s3.head_bucket(Bucket=bucket)
    except _Missing:
        _s3_call(uri, s3.create_bucket, Bucket=bucket)
