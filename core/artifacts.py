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
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pqflow.errors import ArtifactError, PqflowError

MANIFEST = "manifest.json"
FORMAT = "pqflow-artifact/1"
CACHE_ENV = "PQFLOW_CACHE_DIR"
MAX_FILES = 100_000
MAX_MANIFEST_BYTES = 64 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")
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
    # O_NOFOLLOW: a symlink swapped in after the check is not read through
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
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
        rel = p.relative_to(folder).as_posix()
        # Only the top-level manifest is the artifact's own: a nested one belongs to an artifact held
        # inside this one (the export stage's formats) and is listed and hashed like any file.
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
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
    """A manifest's shape, every listed path, and its digest recomputed from its file list.

    The digest names the S3 cache folder and the file names become local paths: neither is
    trusted as written."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise ArtifactError(f"{where}: not a pqflow manifest")
    files = manifest["files"]
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise ArtifactError(f"{where}: 'files' must map at most {MAX_FILES} relative paths to their sha256 and bytes")
    for rel, info in files.items():
        check_relpath(rel, where)
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or not _HEX64.fullmatch(info["sha256"]) or type(info.get("bytes")) is not int or info["bytes"] < 0):
            raise ArtifactError(f"{where}: entry '{rel}' needs a hex sha256 and a non-negative byte count")
    if manifest.get("digest") != canonical_digest(files):
        raise ArtifactError(f"{where}: the manifest's digest does not match its file list (tampered or corrupted)")
    return manifest


def check_relpath(rel: Any, where: str) -> str:
    """``rel`` as a normalised relative POSIX path that stays inside its artifact."""
    ok = (isinstance(rel, str) and 0 < len(rel) <= 1024 and "\\" not in rel and "\x00" not in rel
          and not rel.startswith("/"))
    parts = rel.split("/") if ok else []
    if not ok or any(p in ("", ".", "..") for p in parts) or rel == MANIFEST or len(parts) > 32:
        raise ArtifactError(f"{where}: file name {rel!r} is not a plain relative path inside the artifact")
    return rel


def _verify(folder: Path, manifest: dict[str, Any], uri: str) -> None:
    """Every listed file is a regular file with its recorded size and sha256, and nothing else is
    there: no unlisted file (it could shadow weights), no symlink, no device or pipe."""
    listed = set(manifest["files"])
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            rel = p.relative_to(folder).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"artifact {uri}: {rel} is a symlink; artifacts hold regular files only")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"artifact {uri}: {rel} is not a regular file")
            if rel not in listed and rel != MANIFEST:
                raise ArtifactError(f"artifact {uri}: file {rel} is not listed in the manifest (extra files are "
                                    "never loaded; remove it or re-run the stage)")
    for rel, info in manifest["files"].items():
        p = folder / rel
        try:
            st = p.lstat()
        except FileNotFoundError:
            raise ArtifactError(f"artifact {uri}: file {rel} listed in the manifest is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact {uri}: file {rel} listed in the manifest is not a regular file")
        if st.st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"artifact {uri}: file {rel} is corrupted (sha256 does not match the manifest)")


# -- S3 --------------------------------------------------------------------------------------------

def _s3():
    import boto3
    from botocore.config import Config

    # botocore's standard retry mode backs off on throttling, 5xx and connection errors; with these
    # timeouts a hanging endpoint fails after 3 tries x (5 s connect or 15 s read) plus backoff: under a
    # minute. (``max_attempts`` would count retries only: ``total_max_attempts`` includes the first try.)
    cfg = Config(connect_timeout=5, read_timeout=15, retries={"total_max_attempts": 3, "mode": "standard"})
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
            obj = _s3().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
            if obj.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"{uri}/{MANIFEST}: larger than {MAX_MANIFEST_BYTES} bytes, not a pqflow manifest")
            body = obj["Body"].read()
    except _Missing:
        return None
    try:
        return _check_manifest(json.loads(body), f"{uri}/{MANIFEST}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{uri}/{MANIFEST}: manifest is not valid JSON") from None


def _s3_publish(folder: Path, uri: str, manifest: dict[str, Any]) -> None:
    bucket, prefix = _split_s3(uri)
    s3 = _s3()
    # An older artifact at this prefix stops being valid before any of its files are replaced.
    _s3_call(uri, s3.delete_object, Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    uploaded: list[str] = []
    try:
        # nested artifacts' manifests after their files, so that each of them also lands last
        for rel in sorted(manifest["files"], key=lambda r: r.rsplit("/", 1)[-1] == MANIFEST):
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


# -- staging folders -------------------------------------------------------------------------------
# Every temporary folder pqflow makes carries its owner's pid, so that the next run can remove the
# ones a killed process left behind (and never those of a process still running).

def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _clean_stale(parent: Path, pattern: str) -> None:
    """Remove ``parent/<pattern>`` folders whose owner (``...-<pid>-<hex8>``) no longer runs."""
    for p in parent.glob(pattern):
        m = re.search(r"-(\d+)-[0-9a-f]{8}$", p.name)
        if m and _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _s3_fetch(uri: str, manifest: dict[str, Any]) -> Path:
    bucket, prefix = _split_s3(uri)
    root = _cache_root()
    # the folder is named by the digest recomputed from the file list, never by the stored string
    dest = root / canonical_digest(manifest["files"])
    if (dest / MANIFEST).is_file():
        try:
            _verify(dest, manifest, uri)
            return dest
        except ArtifactError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, ".fetch-*")
    tmp = root / f".fetch-{_tag()}"
    tmp.mkdir()
    try:
        s3 = _s3()
        for rel in manifest["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _s3_call(uri, s3.download_file, bucket, f"{prefix}/{rel}", str(tmp / rel))
        _verify(tmp, manifest, uri)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if dest.exists() or dest.is_symlink():
            old = root / f".fetch-{_tag()}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
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
    if p.is_symlink() or p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{p}: not a pqflow manifest (a symlink, or larger than {MAX_MANIFEST_BYTES} bytes)")
    try:
        return _check_manifest(json.loads(p.read_bytes()), str(p))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{p}: manifest is not valid JSON") from None


def open_artifact(uri: str) -> Artifact:
    """Resolve ``uri`` to a local folder whose every file matches its manifest, and holds nothing else."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise ArtifactError(f"no artifact at {uri}: {MANIFEST} is missing (never written, or the stage failed)")
    folder = _s3_fetch(uri, manifest) if is_s3(uri) else local_path(uri)
    if not is_s3(uri):
        _verify(folder, manifest, uri)
    return Artifact(uri, folder, manifest)


def same_place(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same artifact location, or one lies inside the other."""
    if is_s3(a) != is_s3(b):
        return False
    if is_s3(a):
        (ba, pa), (bb, pb) = _split_s3(a), _split_s3(b)
        pa, pb = f"{pa}/", f"{pb}/"
        return ba == bb and (pa.startswith(pb) or pb.startswith(pa))
    ra, rb = local_path(a).resolve(), local_path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def check_destination(uri: str, inputs: dict[str, str] | None = None) -> None:
    """Refuse an output location whose contents pqflow must not replace: one that is not a pqflow
    artifact (a user's folder or file, the working directory) or that holds one of the step's inputs.
    An absent or empty location is fine."""
    for name, src in (inputs or {}).items():
        if same_place(uri, src):
            raise ArtifactError(f"output {uri} overlaps input '{name}' ({src}): write the output elsewhere")
    if is_s3(uri):
        if read_manifest(uri) is not None:
            return
        bucket, prefix = _split_s3(uri)
        with _s3_errors(uri, missing_ok=True):
            try:
                listed = _s3().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
            except _Missing:
                return
        if listed.get("KeyCount", 0):
            raise ArtifactError(f"output {uri} holds objects but no pqflow artifact; pqflow replaces only its "
                                "own artifacts: choose an empty prefix")
        return
    dest = local_path(uri)
    real, cwd = dest.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve():
        raise ArtifactError(f"output {uri} is the working directory, one of its parents or the home folder")
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ArtifactError(f"output {uri} exists and is not a folder; pqflow replaces only its own artifacts")
    if not any(dest.iterdir()):
        return
    try:
        manifest = json.loads((dest / MANIFEST).read_bytes())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        raise ArtifactError(f"output {uri} is a folder that is not a pqflow artifact (no {MANIFEST}); "
                            "pqflow replaces only its own artifacts: choose a new or empty folder")


def staging_dir(uri: str) -> Path:
    """A fresh local folder to build an artifact in (beside the destination when it is local,
    so that publishing is one rename). Staging folders of killed runs are removed first."""
    if is_s3(uri):
        tmp = Path(tempfile.gettempdir())
        _clean_stale(tmp, "pqflow-stage-*")
        work = tmp / f"pqflow-stage-{_tag()}"
        work.mkdir(mode=0o700)
        return work
    dest = local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest.parent, f".{dest.name}.partial-*")
    _clean_stale(dest.parent, f".{dest.name}.old-*")
    tmp = dest.parent / f".{dest.name}.partial-{_tag()}"
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
    if dest.exists() or dest.is_symlink():
        check_destination(uri)  # checked before the stage ran; checked again just before replacing
        old = dest.parent / f".{dest.name}.old-{_tag()}"
        os.replace(dest, old)
        os.replace(folder, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, dest)


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def produce(name: str, out_uri: str, fingerprint: str, params: dict[str, Any], inputs: dict[str, Artifact],
            build: Callable[[Path], dict[str, Any]], *, force: bool = False,
            announce: bool = True) -> tuple[dict[str, Any], bool]:
    """The artifact at ``out_uri`` for this ``fingerprint``: reused when a verified one is there (and
    not ``force``), else ``build(staging folder) -> summary`` writes its files and it is published
    with a manifest (nothing is left behind when ``build`` fails). Returns (manifest, reused).
    ``announce``: say on stderr that it runs (a command whose only output is its result says nothing)."""
    try:
        existing = read_manifest(out_uri)
    except ArtifactError as e:
        print(f"[pqflow] {name}: existing output unusable ({e}); running again", file=sys.stderr)
        existing = None
    if existing is not None and existing.get("fingerprint") == fingerprint and not force:
        try:
            open_artifact(out_uri)
            print(f"[pqflow] {name}: up to date at {out_uri}, skipped", file=sys.stderr)
            return existing, True
        except PqflowError as e:
            print(f"[pqflow] {name}: existing output unusable ({e}); running again", file=sys.stderr)
    work = staging_dir(out_uri)
    try:
        if announce:
            print(f"[pqflow] {name}: running -> {out_uri}", file=sys.stderr)
        summary = build(work)
        manifest = build_manifest(work, stage=name, params=params,
                                  inputs={k: {"uri": a.uri, "digest": a.digest} for k, a in inputs.items()},
                                  fingerprint=fingerprint, summary=summary)
        publish(work, out_uri, manifest)
    except BaseException:
        discard(work)
        raise
    return manifest, False


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
