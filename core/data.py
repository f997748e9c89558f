"""Text sources, calibration windows and the evaluation token stream.

Splits: ``train`` (calibration, fine-tuning), ``heldout`` (search objectives, fine-tuning
validation) and ``test`` (evaluation only). WikiText-2 is read from ``$PQFLOW_DATA_DIR``
(``wikitext-2-raw/wiki.*.raw``) when set, else from the hub dataset. Offline there is no train
split: ``train`` is the first 90% of the valid split and ``heldout`` its last 10%, so neither
overlaps ``test``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch

from pqflow.errors import SourceError

Split = Literal["train", "heldout", "test"]
DATA_DIR_ENV = "PQFLOW_DATA_DIR"
TRAIN_FRACTION = 0.9


def _rows_from_raw(raw: str) -> list[str]:
    # The hub's rows are the raw file's lines: a blank line becomes "", any other keeps its "\n".
    return ["" if not line.strip() else line + "\n" for line in raw.split("\n")[:-1]]


def _split_rows(rows: list[str], split: Split) -> list[str]:
    cut = int(len(rows) * TRAIN_FRACTION)
    return rows[:cut] if split == "train" else rows[cut:]


def wikitext2_rows(split: Split) -> list[str]:
    folder = os.environ.get(DATA_DIR_ENV)
    if folder:
        d = Path(folder).expanduser()
        d = d / "wikitext-2-raw" if (d / "wikitext-2-raw").is_dir() else d
        if split == "test":
            return _rows_from_raw(_read(d / "wiki.test.raw"))
        if split == "train" and (d / "wiki.train.raw").is_file():
            return _rows_from_raw(_read(d / "wiki.train.raw"))
        valid = _rows_from_raw(_read(d / "wiki.valid.raw"))
        if (d / "wiki.train.raw").is_file():
            return valid
        return _split_rows(valid, split)
    return _hub_rows(split)


def _hub_rows(split: Split) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise SourceError(
            f"WikiText-2: set {DATA_DIR_ENV} to a folder with wikitext-2-raw/wiki.*.raw, "
            "or install pqflow[hub] to read the hub dataset"
        ) from None
    name = {"train": "train", "heldout": "validation", "test": "test"}[split]
    try:
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=name)
    except Exception as e:  # noqa: BLE001 - network/hub failures have many types
        raise SourceError(
            f"WikiText-2 from the hub failed ({type(e).__name__}); set {DATA_DIR_ENV} to a local copy"
        ) from None
    return list(ds["text"])


def _read(path: Path) -> str:
    if not path.is_file():
        raise SourceError(f"data file not found: {path}")
    return path.read_text(encoding="utf-8")


def _file_rows(source: str, field: str) -> list[str]:
    kind, _, path = source.partition(":")
    p = Path(path).expanduser()
    if kind == "text":
        return _rows_from_raw(_read(p))
    rows = []
    for i, line in enumerate(_read(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or field not in rec:
            raise SourceError(f"{p}:{i}: no field '{field}'")
        rows.append(str(rec[field]))
    return rows


def load_text(source: str, split: Split, field: str = "text") -> str:
    """The text of ``split``. For local files, ``test`` is the whole file and ``train`` /
    ``heldout`` are its first 90% / last 10% of lines (documents for jsonl)."""
    if source == "wikitext2":
        return "\n\n".join(wikitext2_rows(split))
    if source.startswith(("text:", "jsonl:")):
        rows = _file_rows(source, field)
        if split != "test":
            rows = _split_rows(rows, split)
        return "\n\n".join(rows)
    raise SourceError(f"unknown data source '{source}'")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once with the tokenizer's defaults; returns a 1-D LongTensor."""
    ids = tokenizer(text, return_tensors="pt", return_attention_mask=False).input_ids
    return ids[0].to(torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start, tail dropped: ``[n, seqlen]``."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SourceError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens (GPTQ-style calibration), reproducible by seed."""
    if ids.numel() <= seqlen:
        raise SourceError(f"calibration text has {ids.numel()} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
