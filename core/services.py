"""Embedded services for a laptop run: an S3 endpoint (moto's server) and an MLflow tracking server
(sqlite backend, artifacts in that S3), both on loopback, on free ports.

moto keeps objects in memory, so the S3 contents are mirrored to ``<state>/s3/<bucket>/<key>`` when
the services stop and uploaded again when they start: artifacts, registered models and the
resume manifests survive from one ``pqflow run`` to the next. ``pqflow up`` starts them and keeps
them running; a ``pqflow run`` that finds them running (``<state>/services.json``) uses them and
leaves them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pqflow.errors import PqflowError

STATE_ENV = "PQFLOW_STATE_DIR"
DEFAULT_STATE = "pqflow-runs/services"
MLFLOW_BUCKET = "mlflow"
DUMMY_CREDS = {"AWS_ACCESS_KEY_ID": "pqflow", "AWS_SECRET_ACCESS_KEY": "pqflow-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
INDEX = "s3-index.json"


def state_dir(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(STATE_ENV) or DEFAULT_STATE).expanduser().absolute()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PqflowError(f"{what or url} exited with code {proc.returncode} before answering {url}")
        if http_ok(url):
            return
        time.sleep(0.25)
    raise PqflowError(f"{what or url} did not answer {url} within {timeout:.0f}s")


@dataclass
class Services:
    """Running embedded services. ``owned``: this process started them (and stops them)."""

    state: Path
    s3_url: str | None = None
    mlflow_url: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    owned: bool = True
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _logs: list = field(default_factory=list, repr=False)
    _mlflow_s3: str | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """Environment for clients of these services (boto3, pqflow artifacts, mlflow)."""
        out: dict[str, str] = {}
        if self.s3_url:
            out.update(DUMMY_CREDS, AWS_ENDPOINT_URL=self.s3_url, MLFLOW_S3_ENDPOINT_URL=self.s3_url)
        if self.mlflow_url:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_url
        return out

    def alive(self) -> bool:
        """Every process this object started is still running."""
        return all(p.poll() is None for p in self._procs.values())

    def healthy(self) -> bool:
        return all(http_ok(u) for u in (self._s3_health(), self._mlflow_health()) if u)

    def _s3_health(self) -> str | None:
        return f"{self.s3_url}/moto-api/" if self.s3_url else None

    def _mlflow_health(self) -> str | None:
        return f"{self.mlflow_url}/health" if self.mlflow_url else None

    # -- lifecycle ----------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.state / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                cwd=self.state, start_new_session=True)
        self._procs[name] = proc
        self.pids[name] = proc.pid
        return proc

    def spawn_s3(self, port: int | None = None) -> None:
        port = port or free_port()
        self.s3_url = f"http://127.0.0.1:{port}"
        self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {})

    def wait_s3(self, timeout: float = 60) -> None:
        wait_http(self._s3_health(), timeout, self._procs["s3"], "embedded S3 (moto_server)")
        restore_s3(self.s3_url, self.state)

    def spawn_mlflow(self, port: int | None = None, s3_url: str | None = None) -> None:
        s3_url = s3_url or self.s3_url
        if not s3_url:
            raise PqflowError("the embedded MLflow server keeps its artifacts in S3: start S3 first or give an endpoint")
        port = port or free_port()
        self.mlflow_url = f"http://127.0.0.1:{port}"
        self._mlflow_s3 = s3_url
        env = {**DUMMY_CREDS, "MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_ENDPOINT_URL": s3_url} if s3_url == self.s3_url \
            else {"MLFLOW_S3_ENDPOINT_URL": s3_url}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"]
        self._spawn("mlflow", cmd, env)

    def wait_mlflow(self, timeout: float = 120) -> None:
        _ensure_bucket(self._mlflow_s3, MLFLOW_BUCKET, embedded=self._mlflow_s3 == self.s3_url)
        wait_http(self._mlflow_health(), timeout, self._procs["mlflow"], "embedded MLflow server")

    def save(self) -> None:
        data = {"s3_url": self.s3_url, "mlflow_url": self.mlflow_url, "pids": self.pids, "owner": os.getpid()}
        (self.state / "services.json").write_text(json.dumps(data, indent=2))

    def stop(self) -> None:
        """Mirror S3 to the state dir, then stop what this process started."""
        if not self.owned:
            return
        if self.s3_url and "s3" in self._procs and self._procs["s3"].poll() is None:
            try:
                snapshot_s3(self.s3_url, self.state)
            except Exception as e:  # noqa: BLE001 - never leave the servers running because of this
                print(f"[pqflow] warning: could not save the embedded S3 contents: {e}", file=sys.stderr)
        for name in ("mlflow", "s3"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()
        with contextlib.suppress(FileNotFoundError):
            info = json.loads((self.state / "services.json").read_text())
            if info.get("owner") == os.getpid():
                (self.state / "services.json").unlink()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def running(state: str | os.PathLike[str] | None = None, timeout: float = 30) -> Services | None:
    """Services started by ``pqflow up`` with this state dir, when they still answer."""
    st = state_dir(state)
    try:
        info = json.loads((st / "services.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    svc = Services(st, info.get("s3_url"), info.get("mlflow_url"), info.get("pids", {}), owned=False)
    if not _pid_alive(info.get("owner")):
        (st / "services.json").unlink(missing_ok=True)  # left by a process that died
        return None
    # Their owner lives: give a busy machine time to answer rather than start a second set on the
    # same sqlite file and S3 mirror.
    for url, what in ((svc._s3_health(), "S3"), (svc._mlflow_health(), "MLflow")):
        if url:
            wait_http(url, timeout, what=f"embedded {what} of process {info.get('owner')} (state {st})")
    return svc


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def start(state: str | os.PathLike[str] | None = None, *, s3: bool = True, mlflow: bool = True,
          s3_url: str | None = None, s3_port: int | None = None, mlflow_port: int | None = None) -> Services:
    """Start the embedded services (S3 unless ``s3_url`` is given; MLflow with artifacts in that S3)."""
    st = state_dir(state)
    st.mkdir(parents=True, exist_ok=True)
    svc = Services(st)
    try:
        # Both start at once (MLflow needs ~10 s to answer); the S3 mirror is restored meanwhile.
        if s3 and not s3_url:
            svc.spawn_s3(s3_port)
        if mlflow:
            svc.spawn_mlflow(mlflow_port, s3_url)
        if s3 and not s3_url:
            svc.wait_s3()
        if mlflow:
            svc.wait_mlflow()
    except BaseException:
        svc.stop()
        raise
    svc.save()
    return svc


# -- S3 mirror ----------------------------------------------------------------------------------------

def _client(url: str, embedded: bool = True):
    """boto3 S3 client for ``url``: the embedded server takes dummy credentials, any other
    endpoint the standard AWS environment variables."""
    import boto3
    from botocore.config import Config

    creds = {"aws_access_key_id": DUMMY_CREDS["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"],
             "region_name": "us-east-1"} if embedded else {}
    return boto3.client("s3", endpoint_url=url, **creds,
                        config=Config(connect_timeout=5, retries={"max_attempts": 3, "mode": "standard"}))


def _ensure_bucket(url: str, bucket: str, embedded: bool = True) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = _client(url, embedded)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
    except BotoCoreError as e:
        raise PqflowError(f"S3 endpoint {url} unreachable: {e}") from None


def snapshot_s3(url: str, state: Path) -> int:
    """Copy every object of the embedded S3 to ``state/s3`` (only what changed); returns files written."""
    s3 = _client(url)
    mirror = state / "s3"
    index_path = state / INDEX
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    seen: dict[str, str] = {}
    todo: list[tuple[str, str, Path]] = []
    for b in s3.list_buckets().get("Buckets", []):
        bucket = b["Name"]
        (mirror / bucket).mkdir(parents=True, exist_ok=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                rel = f"{bucket}/{obj['Key']}"
                tag = f"{obj['ETag']}:{obj['Size']}"
                seen[rel] = tag
                dest = mirror / rel
                if index.get(rel) != tag or not dest.is_file():
                    todo.append((bucket, obj["Key"], dest))

    def fetch(item: tuple[str, str, Path]) -> None:
        bucket, key, dest = item
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        s3.download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fetch, todo))
    for rel in set(index) - set(seen):
        with contextlib.suppress(FileNotFoundError):
            (mirror / rel).unlink()
    index_path.write_text(json.dumps(seen, indent=1, sort_keys=True))
    return len(todo)


def restore_s3(url: str, state: Path) -> int:
    """Upload the mirror in ``state/s3`` into a fresh embedded S3; returns objects uploaded."""
    mirror = state / "s3"
    if not mirror.is_dir():
        return 0
    s3 = _client(url)
    items = []
    for bdir in sorted(p for p in mirror.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bdir.name)
        items += [(bdir.name, f.relative_to(bdir).as_posix(), f) for f in bdir.rglob("*")
                  if f.is_file() and not f.name.endswith(".part")]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda it: s3.upload_file(str(it[2]), it[0], it[1]), items))
    # moto's ETags equal the mirror's after a re-upload of the same bytes (single-part MD5);
    # refresh the index so that the next snapshot copies only what changed.
    seen = {}
    for b in s3.list_buckets().get("Buckets", []):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                seen[f"{b['Name']}/{obj['Key']}"] = f"{obj['ETag']}:{obj['Size']}"
    (state / INDEX).write_text(json.dumps(seen, indent=1, sort_keys=True))
    return len(items)
