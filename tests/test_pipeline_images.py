"""Each stage image's dependency set, proven without Docker: a clean venv with only that stage's
extra (+ tracking, kfp) runs the stage on the tiny model through its entrypoint and through KFP's
executor (docker/check_deps.py). Needs a package index; minutes per stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["calibrate", "export", "evaluate"])
def test_stage_runs_in_a_clean_venv_with_only_its_extra(stage, tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "docker" / "check_deps.py"), stage, "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert f"OK {stage}:" in p.stdout
