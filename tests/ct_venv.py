"""The clean venv that scores compressed-tensors exports: only torch, transformers (this venv's
versions) and the pinned compressed-tensors, never pqflow. Built once, cached under
``~/.cache/pqflow/venvs`` (or ``$PQFLOW_CT_VENV``), shared by the tests and ``bench/export.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path


def clean_venv(ct_version: str) -> Path:
    """The venv's python; RuntimeError with pip's last line when it cannot be built."""
    torch_v, tf = version("torch").split("+")[0], version("transformers")
    root = Path(os.environ.get("PQFLOW_CT_VENV") or Path.home() / ".cache" / "pqflow" / "venvs"
                / f"ct-{ct_version}-tf{tf}-torch{torch_v}")
    py = root / "bin" / "python"
    if (root / ".complete").is_file():
        return py
    t0 = time.perf_counter()
    subprocess.run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", "--clear", str(root)], check=True)
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_v}", f"transformers=={tf}",
                          f"compressed-tensors=={ct_version}"], capture_output=True, text=True)
    if pip.returncode:
        raise RuntimeError(f"cannot build the clean venv: {pip.stderr.strip().splitlines()[-1:]}")
    (root / ".complete").write_text(f"built in {time.perf_counter() - t0:.0f} s\n")
    return py
