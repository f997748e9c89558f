"""What every bench shares: the markdown table it prints (the same rows go to
bench/results/<name>.json) and where it reads WikiText-2 from."""

from __future__ import annotations

import os
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
