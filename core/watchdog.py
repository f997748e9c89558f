"""Clean up after pqflow processes that die without doing it themselves (SIGKILL, OOM killer).

``python -m pqflow.watchdog OWNER_PID OWNER_START STATE PGID...`` runs beside a process that started
embedded services (:mod:`pqflow.services`). It polls the owner every half second; once the owner is
gone and no other process holds ``<state>/services.users``, it mirrors the embedded S3 to the state
folder (MLflow's artifacts live there) and stops the services' process groups, then exits. It also
exits as soon as the services are gone (the owner stopped them).

It is not tied to its parent with ``PR_SET_PDEATHSIG``: its whole job starts when the parent dies.

Scratch folders: a process names its temporary folders ``pqflow-<kind>-<pid>-*``
(:func:`scratch_dir`); :func:`clean_stale_scratch` removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

POLL = 0.5
_SCRATCH_RE = re.compile(r"^pqflow-[a-z]+-(\d+)-")


def _log(msg: str) -> None:
    print(f"[pqflow watchdog {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _shutdown(owner: int, state: Path, pgids: list[int]) -> bool:
    """Mirror S3 and stop the services, unless another process still uses them; True when done."""
    from pqflow import services

    try:
        with services.locked(state, timeout=0.5):
            users = services.try_lock(state / services.USERS, fcntl.LOCK_EX)
            if users is None:
                return False  # another pqflow process uses the services: wait for it to end
            try:
                _stop(owner, state, pgids)
            finally:
                os.close(users)
            return True
    except services.PqflowError:
        return False  # someone is starting, discovering or stopping: look again later


def _stop(owner: int, state: Path, pgids: list[int]) -> None:
    from pqflow import services

    info = _info(state)
    # Mirror only a set that finished starting (services.json is written after the restore):
    # mirroring a half-restored S3 would delete the objects not yet uploaded from the mirror.
    if info.get("owner") == owner and info.get("s3_embedded") and info.get("s3_url"):
        try:
            n = services.snapshot_s3(info["s3_url"], state)
            _log(f"mirrored the embedded S3 ({n} new or changed objects)")
        except Exception as e:  # noqa: BLE001 - stop the services all the same
            _log(f"could not mirror the embedded S3: {e}")
    services.kill_groups(pgids, state)
    if info.get("owner") == owner:
        (state / services.INFO).unlink(missing_ok=True)
    _log(f"process {owner} is gone: stopped its embedded services")


def _info(state: Path) -> dict:
    from pqflow import services

    try:
        data = json.loads((state / services.INFO).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def watch(owner: int, owner_start: float | None, state: Path, pgids: list[int]) -> int:
    from pqflow import services

    while True:
        time.sleep(POLL)
        if not any(services.group_alive(g, state) for g in pgids):
            return 0  # stopped by their owner (or they died): nothing left to do
        if services.same_process(owner, owner_start):
            continue
        if _shutdown(owner, state, pgids):
            return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    owner, owner_start, state, *pgids = args
    start = None if owner_start == "None" else float(owner_start)
    return watch(int(owner), start, Path(state), [int(g) for g in pgids])


# -- scratch folders ----------------------------------------------------------------------------------

def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named after this process, so that a later run can tell it is stale."""
    return tempfile.TemporaryDirectory(prefix=f"pqflow-{kind}-{os.getpid()}-")


def clean_stale_scratch(base: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove ``pqflow-<kind>-<pid>-*`` folders of this user whose process no longer runs."""
    from pqflow.services import process_start

    removed = []
    root = Path(base or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = _SCRATCH_RE.match(entry.name)
            if not m or process_start(int(m.group(1))) is not None:
                continue
            try:
                st = entry.lstat()
            except OSError:
                continue
            # only real folders of this user: never follow a link, never touch someone else's files
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


if __name__ == "__main__":
    sys.exit(main())
