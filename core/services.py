"""Embedded services for a laptop run: an S3 endpoint (moto's server) and an MLflow tracking server
(sqlite backend, artifacts in that S3), both on loopback, on free ports.

moto keeps objects in memory, so the S3 contents are mirrored to ``<state>/s3/<bucket>/<key>`` when
the services stop and uploaded again when they start: artifacts, registered models and the
resume manifests survive from one ``pqflow run`` to the next. ``pqflow up`` starts them and keeps
them running; a ``pqflow run`` that finds them running (``<state>/services.json``) uses them and
leaves them up.

One state folder has at most one set of services:

* ``<state>/services.lock`` (an exclusive ``flock``) serialises starting, discovering and stopping
  them, so a second process waits for the first one's services and reuses them;
* every process using them holds a shared ``flock`` on ``<state>/services.users``; the owner stops
  them only when it is the last user, otherwise the last user's exit does (through the watchdog);
* a watchdog process (:mod:`pqflow.watchdog`) outlives an owner killed with SIGKILL: it mirrors S3
  to the state folder and stops the services' process groups once no process uses them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
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
INFO = "services.json"
LOCK = "services.lock"
USERS = "services.users"
# The S3 client gives up on an endpoint that does not answer within connect 5 s + read 20 s, tried
# twice in all (~42 s worst case with the standard-mode backoff): below the minute the docs promise.
# botocore's "max_attempts" counts retries only; "total_max_attempts" counts the first try too.
S3_CONNECT_TIMEOUT = 5
S3_READ_TIMEOUT = 20
S3_TOTAL_ATTEMPTS = 2
LOCK_WAIT = 300  # a concurrent start of MLflow takes up to ~2 min on a busy laptop
STOP_GRACE = 5.0
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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


# -- locks and process groups ------------------------------------------------------------------------

@contextlib.contextmanager
def locked(state: Path, timeout: float = LOCK_WAIT) -> Iterator[None]:
    """Hold ``<state>/services.lock`` exclusively (start, discovery and shutdown of the services)."""
    fd = os.open(state / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PqflowError(f"another pqflow process has held {state / LOCK} for {timeout:.0f}s "
                                      f"(starting or stopping the embedded services); try again later") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def try_lock(path: Path, mode: int, fd: int | None = None) -> int | None:
    """``flock`` ``path`` (or ``fd``) without waiting; returns the descriptor, or None when it is held."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        if own:
            os.close(fd)
        return None


def process_start(pid: int | None) -> float | None:
    """Start time of ``pid`` (None when it does not run), to tell a process from a later one with its pid."""
    import psutil

    try:
        p = psutil.Process(int(pid or 0))
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except (psutil.Error, ValueError):
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    now = process_start(pid)
    return now is not None and (started is None or abs(now - started) < 0.01)


def _members(pgid: int) -> list:
    """Running (not zombie) processes of process group ``pgid``."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(p.pid) == pgid:
                out.append(p)
    return out


def group_alive(pgid: int, state: Path) -> bool:
    """Some process of group ``pgid`` still runs in ``state``: every service starts with cwd = state,
    which keeps a recycled process group id of someone else's from being taken for ours."""
    import psutil

    where = os.path.realpath(state)
    for p in _members(pgid):
        with contextlib.suppress(psutil.Error):
            if p.cwd() == where:
                return True
    return False


def kill_groups(pgids: list[int], state: Path, grace: float = STOP_GRACE,
                reap: Callable[[], object] | None = None) -> None:
    """SIGTERM every live group of ours, SIGKILL what is left after ``grace`` seconds. The group is
    signalled even when its leader has exited: uvicorn and MLflow's job workers stay in it.
    ``reap`` collects exited leaders that are this process's children (a zombie counts as gone)."""
    live = [g for g in pgids if group_alive(g, state)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for g in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            if reap is not None:
                reap()
            live = [g for g in live if _members(g)]
        if not live:
            return


@dataclass
class Services:
    """Running embedded services. ``owned``: this process started them (and stops them once no
    other process uses them)."""

    state: Path
    s3_url: str | None = None
    mlflow_url: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    owned: bool = True
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _logs: list = field(default_factory=list, repr=False)
    _mlflow_s3: str | None = field(default=None, repr=False)
    _users_fd: int | None = field(default=None, repr=False)
    _watchdog: subprocess.Popen | None = field(default=None, repr=False)
    _restored: bool = field(default=False, repr=False)

    def env(self) -> dict[str, str]:
        """Environment for clients of these services (boto3, pqflow artifacts, mlflow)."""
        out: dict[str, str] = {}
        if self.s3_url:
            out.update(DUMMY_CREDS, AWS_ENDPOINT_URL=self.s3_url, MLFLOW_S3_ENDPOINT_URL=self.s3_url)
        if self.mlflow_url:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_url
        return out

    def alive(self) -> bool:
        """Every service is still running (for reused services: their process groups)."""
        if self._procs:
            return all(p.poll() is None for p in self._procs.values())
        return all(group_alive(pid, self.state) for pid in self.pids.values())

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
        # Own session: Ctrl-C in the terminal reaches pqflow, which stops the services in order.
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
        self._restored = True

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

    def spawn_watchdog(self) -> None:
        """Start the process that cleans up after this one if it dies without stopping the services."""
        log = open(self.state / "watchdog.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        cmd = [sys.executable, "-m", "pqflow.watchdog", str(os.getpid()), str(process_start(os.getpid())),
               str(self.state), *(str(p) for p in self.pids.values())]
        self._watchdog = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.state,
                                          start_new_session=True)

    def join(self) -> None:
        """Count this process among the users of the services (until stop() or its exit)."""
        if self._users_fd is None:
            fd = os.open(self.state / USERS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # only held exclusively, briefly, by a stopping owner
            self._users_fd = fd

    def leave(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None

    def save(self) -> None:
        me = os.getpid()
        data = {"s3_url": self.s3_url, "mlflow_url": self.mlflow_url, "pids": self.pids, "owner": me,
                "owner_started": process_start(me), "s3_embedded": "s3" in self._procs,
                "watchdog": self._watchdog.pid if self._watchdog else None,
                "watchdog_started": process_start(self._watchdog.pid) if self._watchdog else None}
        tmp = self.state / f".{INFO}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state / INFO)

    def stop(self) -> None:
        """Stop the services this process started, after mirroring S3 to the state dir; while other
        processes still use them they stay up, and the watchdog stops them after the last one."""
        if not self.owned:
            self.leave()
            return
        with locked(self.state):
            if self._users_fd is not None and try_lock(self.state / USERS, fcntl.LOCK_EX, self._users_fd) is None:
                print(f"[pqflow] the embedded services stay up for the other pqflow processes using {self.state}; "
                      "they stop after the last one", file=sys.stderr)
                self.owned = False  # the watchdog stops them now; a second stop() must not
                self.leave()
                self._close_logs()
                return
            self.shutdown()

    def shutdown(self) -> None:
        """Mirror S3 (when this set restored it), then stop every service group and the watchdog."""
        if self._restored and self.s3_url and self._procs.get("s3") and self._procs["s3"].poll() is None:
            try:
                snapshot_s3(self.s3_url, self.state)
            except Exception as e:  # noqa: BLE001 - never leave the servers running because of this
                print(f"[pqflow] warning: could not save the embedded S3 contents: {e}", file=sys.stderr)
        kill_groups([self.pids[n] for n in ("mlflow", "s3") if n in self.pids], self.state,
                    reap=lambda: [p.poll() for p in self._procs.values()])
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if self._watchdog is not None:
            with contextlib.suppress(ProcessLookupError):
                self._watchdog.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            info = json.loads((self.state / INFO).read_text())
            if info.get("owner") == os.getpid():
                (self.state / INFO).unlink()
        self.leave()
        self._close_logs()

    def _close_logs(self) -> None:
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def running(state: str | os.PathLike[str] | None = None, timeout: float = 30) -> Services | None:
    """The services another process runs with this state dir, when they still answer (this process
    then counts as one of their users until it exits or calls ``stop()``)."""
    st = state_dir(state)
    if not (st / INFO).is_file():
        return None
    with locked(st):
        return _discover(st, timeout)


def _discover(st: Path, timeout: float = 30) -> Services | None:
    """``running`` with ``services.lock`` held: stale records of dead owners are cleaned up."""
    try:
        info = json.loads((st / INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pids = {str(k): int(v) for k, v in (info.get("pids") or {}).items()}
    owner_alive = same_process(info.get("owner"), info.get("owner_started"))
    if not owner_alive and not same_process(info.get("watchdog"), info.get("watchdog_started")):
        # Owner and watchdog both gone (both killed): mirror what the embedded S3 still holds, then
        # stop what is left of the services.
        if info.get("s3_embedded") and info.get("s3_url") and "s3" in pids and group_alive(pids["s3"], st) \
                and http_ok(f"{info['s3_url']}/moto-api/"):
            try:
                snapshot_s3(info["s3_url"], st)
            except Exception as e:  # noqa: BLE001 - stop them all the same
                print(f"[pqflow] warning: could not save the embedded S3 contents: {e}", file=sys.stderr)
        kill_groups(list(pids.values()), st)
        (st / INFO).unlink(missing_ok=True)
        return None
    svc = Services(st, info.get("s3_url"), info.get("mlflow_url"), pids, owned=False)
    # Give a busy machine time to answer rather than start a second set on the same sqlite file
    # and S3 mirror.
    for url, what in ((svc._s3_health(), "S3"), (svc._mlflow_health(), "MLflow")):
        if url:
            wait_http(url, timeout, what=f"embedded {what} of process {info.get('owner')} (state {st})")
    if info.get("owner") != os.getpid():  # users are processes: the owner's own lock counts for it
        svc.join()
    return svc


def _pid_alive(pid: int | None) -> bool:
    return process_start(pid) is not None


def start(state: str | os.PathLike[str] | None = None, *, s3: bool = True, mlflow: bool = True,
          s3_url: str | None = None, s3_port: int | None = None, mlflow_port: int | None = None) -> Services:
    """Start the embedded services (S3 unless ``s3_url`` is given; MLflow with artifacts in that S3),
    or, when another process already runs them on this state dir, use those (``owned`` is False)."""
    st = state_dir(state)
    st.mkdir(parents=True, exist_ok=True)
    with locked(st):
        found = _discover(st)
        if found is not None:
            missing = [n for n, want, url in (("S3", s3 and not s3_url, found.s3_url),
                                              ("MLflow", mlflow, found.mlflow_url)) if want and not url]
            if missing:
                found.leave()
                raise PqflowError(f"the services running on {st} have no {' or '.join(missing)}: wait for "
                                  f"their pqflow process to finish, or use another --state-dir")
            return found
        svc = Services(st)
        try:
            # Both start at once (MLflow needs ~10 s to answer); the S3 mirror is restored meanwhile.
            if s3 and not s3_url:
                svc.spawn_s3(s3_port)
            if mlflow:
                svc.spawn_mlflow(mlflow_port, s3_url)
            svc.spawn_watchdog()
            if s3 and not s3_url:
                svc.wait_s3()
            if mlflow:
                svc.wait_mlflow()
            svc.join()
            svc.save()
        except BaseException:
            svc.shutdown()
            raise
    return svc


# -- S3 mirror ----------------------------------------------------------------------------------------

def _client(url: str, embedded: bool = True):
    """boto3 S3 client for ``url``: the embedded server takes dummy credentials, any other
    endpoint the standard AWS environment variables. Bounded: an endpoint that accepts connections
    but never answers fails in under a minute."""
    import boto3
    from botocore.config import Config

    creds = {"aws_access_key_id": DUMMY_CREDS["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"],
             "region_name": "us-east-1"} if embedded else {}
    return boto3.client("s3", endpoint_url=url, **creds,
                        config=Config(connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT,
                                      retries={"total_max_attempts": S3_TOTAL_ATTEMPTS, "mode": "standard"}))


def _ensure_bucket(url: str, bucket: str, embedded: bool = True) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    s3 = _client(url, embedded)
    try:
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            s3.create_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise PqflowError(f"no AWS credentials for the S3 endpoint {url} (set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY)") from None
    except ClientError as e:
        raise PqflowError(f"S3 endpoint {url}: cannot create bucket '{bucket}': {e}") from None
    except BotoCoreError as e:
        raise PqflowError(f"S3 endpoint {url} unreachable: {e}") from None


def mirror_path(root: Path, bucket: str, key: str) -> Path | None:
    """Where object ``bucket/key`` lives in the mirror ``root`` (a resolved path), or None when its
    name cannot be stored there safely: absolute, ``.``/``..``/empty segments, backslashes, NUL,
    or a path that leaves ``root`` through a symlink."""
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        return None
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not text cannot become a key
        return None
    parts = key.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        return None
    dest = root.joinpath(bucket, *parts)
    try:
        if dest.parent.resolve() != dest.parent:  # a symlink (or worse) on the way
            return None
    except (OSError, RuntimeError):
        return None
    return dest


def _warn_skipped(skipped: list[str], what: str) -> None:
    if skipped:
        print(f"[pqflow] warning: S3 mirror: skipped {len(skipped)} {what} "
              f"(e.g. {skipped[0][:200]!r})", file=sys.stderr)


def snapshot_s3(url: str, state: Path) -> int:
    """Copy every object of the embedded S3 to ``state/s3`` (only what changed); returns files written.
    Objects whose keys cannot be stored safely under ``state/s3`` are skipped with a warning."""
    s3 = _client(url)
    mirror = state / "s3"
    mirror.mkdir(parents=True, exist_ok=True)
    root = mirror.resolve()
    tmpdir = state / "s3-tmp"  # outside the mirror: an object key may end in anything
    tmpdir.mkdir(exist_ok=True)
    for old in tmpdir.iterdir():  # partial downloads of a snapshot that was killed
        with contextlib.suppress(OSError):
            old.unlink()
    index_path = state / INDEX
    try:
        index = json.loads(index_path.read_text())
        index = index if isinstance(index, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    seen: dict[str, str] = {}
    todo: list[tuple[str, str, Path]] = []
    skipped: list[str] = []
    written: list[str] = []
    for b in s3.list_buckets().get("Buckets", []):
        bucket = b["Name"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                rel = f"{bucket}/{obj['Key']}"
                dest = mirror_path(root, bucket, obj["Key"])
                if dest is None:
                    skipped.append(rel)
                    continue
                tag = f"{obj['ETag']}:{obj['Size']}"
                seen[rel] = tag
                if index.get(rel) != tag or not dest.is_file() or dest.is_symlink():
                    todo.append((bucket, obj["Key"], dest))

    def fetch(item: tuple[str, str, Path]) -> None:
        bucket, key, dest = item
        tmp = tmpdir / uuid.uuid4().hex
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(tmp))
            os.replace(tmp, dest)  # replaces a planted symlink itself, never its target
            written.append(key)
        except (OSError, ValueError) as e:  # e.g. a key segment longer than the file system allows
            tmp.unlink(missing_ok=True)
            seen.pop(f"{bucket}/{key}", None)
            skipped.append(f"{bucket}/{key} ({e})")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fetch, todo))
    for rel in set(index) - set(seen):
        bucket, _, key = str(rel).partition("/")
        old = mirror_path(root, bucket, key)
        if old is not None:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                old.unlink()
    _warn_skipped(skipped, "object(s) whose keys cannot be stored in the mirror folder")
    index_path.write_text(json.dumps(seen, indent=1, sort_keys=True))
    return len(written)


def _mirror_files(root: Path, skipped: list[str]) -> list[tuple[str, str, Path]]:
    """(bucket, key, path) of every regular file of the mirror; symlinks and unsafe names skipped."""
    items = []
    for bdir in sorted(root.iterdir()):
        if bdir.is_symlink() or not bdir.is_dir() or not _BUCKET_RE.match(bdir.name):
            skipped.append(bdir.name)
            continue
        for dirpath, dirnames, filenames in os.walk(bdir, followlinks=False):
            skipped += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                path = Path(dirpath, name)
                key = path.relative_to(bdir).as_posix()
                if not stat.S_ISREG(path.lstat().st_mode) or mirror_path(root, bdir.name, key) != path:
                    skipped.append(str(path))
                    continue
                items.append((bdir.name, key, path))
    return items


def _open_nofollow(path: Path):
    return open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))  # noqa: SIM115


def restore_s3(url: str, state: Path) -> int:
    """Upload the mirror in ``state/s3`` into a fresh embedded S3; returns objects uploaded. Only
    regular files inside the mirror are uploaded: symlinks are never followed."""
    mirror = state / "s3"
    if not mirror.is_dir():
        return 0
    root = mirror.resolve()
    s3 = _client(url)
    skipped: list[str] = []
    items = _mirror_files(root, skipped)
    for bucket in sorted({b for b, _, _ in items}):
        s3.create_bucket(Bucket=bucket)

    def upload(item: tuple[str, str, Path]) -> None:
        bucket, key, path = item
        with _open_nofollow(path) as f:
            s3.upload_fileobj(f, bucket, key)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, items))
    _warn_skipped(skipped, "entries of the mirror folder that are symlinks or not safe names")
    # moto's ETags equal the mirror's after a re-upload of the same bytes (single-part MD5);
    # refresh the index so that the next snapshot copies only what changed.
    seen = {}
    for b in s3.list_buckets().get("Buckets", []):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                seen[f"{b['Name']}/{obj['Key']}"] = f"{obj['ETag']}:{obj['Size']}"
    (state / INDEX).write_text(json.dumps(seen, indent=1, sort_keys=True))
    return len(items)
