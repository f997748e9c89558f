"""What every bench shares: the markdown table it prints (the same rows go to
bench/results/<name>.json) and where it reads WikiText-2 from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def use_shared_data() -> None:
    """WikiText-2 from the checkout's sibling ``shared/data`` unless PQFLOW_DATA_DIR says otherwise
    (worker subprocesses inherit it)."""
    os.environ.setdefault("PQFLOW_DATA_DIR", str(REPO.parent / "shared" / "data"))


def run_row(cmd: list[str], row_file: Path, label: str) -> dict | None:
    """Run a bench worker process that writes one row to ``row_file``: the row, or None (said on
    stderr) when the worker failed."""
    row_file.unlink(missing_ok=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not row_file.is_file():
        print(f"[bench] {label} failed (exit {rc})", file=sys.stderr)
        return None
    row = json.loads(row_file.read_text())
    row_file.unlink()
    return row


def save_rows(results: Path, rows: list[dict]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=1) + "\n")
