"""Text sources, calibration windows and the evaluation token stream.

Splits: ``train`` (calibration, fine-tuning), ``heldout`` (search objectives, fine-tuning
validation) and ``test`` (evaluation only). WikiText-2 is read from ``$PQFLOW_DATA_DIR``
(``wikitext-2-raw/wiki.*.raw``) when set, else from the hub dataset. Offline there is no train
split: ``train`` is the first 90% of the valid split and ``heldout`` its last 10%, so neither
overlaps ``test``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pqflow.errors import SourceError

if TYPE_CHECKING:  # torch is imported where windows are built: recipe validation uses this module too
    import torch

Split = Literal["train", "heldout", "test"]
DATA_DIR_ENV = "PQFLOW_DATA_DIR"
TRAIN_FRACTION = 0.9


def _rows_from_raw(raw: str) -> list[str]:
    # The hub's rows are the raw file's lines: a blank line becomes "", any other keeps its "\n".
    return ["" if not line.strip() else line + "\n" for line in raw.split("\n")[:-1]]


def _split_rows(rows: list[str], split: Split) -> list[str]:
    cut = int(len(rows) * TRAIN_FRACTION)
    return rows[:cut] if split == "train" else rows[cut:]


def _wikitext2_dir() -> Path | None:
    folder = os.environ.get(DATA_DIR_ENV)
    if not folder:
        return None
    d = Path(folder).expanduser()
    return d / "wikitext-2-raw" if (d / "wikitext-2-raw").is_dir() else d


def _wikitext2_file(d: Path, split: Split) -> Path:
    """The local raw file ``split`` is read from (train and heldout share valid without a train file)."""
    if split == "test":
        return d / "wiki.test.raw"
    if split == "train" and (d / "wiki.train.raw").is_file():
        return d / "wiki.train.raw"
    return d / "wiki.valid.raw"


def wikitext2_rows(split: Split) -> list[str]:
    d = _wikitext2_dir()
    if d is None:
        return _hub_rows(split)
    rows = _rows_from_raw(_read(_wikitext2_file(d, split)))
    if split == "test" or (d / "wiki.train.raw").is_file():
        return rows
    return _split_rows(rows, split)


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


def _check_regular(path: Path, st: os.stat_result) -> None:
    # A directory, FIFO or device (/dev/zero) would fail obscurely or be read forever.
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"data file {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"data file {path} is not a regular file")


def _read(path: Path) -> str:
    try:
        _check_regular(path, path.stat())
        with open(path, "rb") as f:
            _check_regular(path, os.fstat(f.fileno()))  # the file opened, not a swapped-in link target
            raw = f.read()
    except FileNotFoundError:
        raise SourceError(f"data file not found: {path}") from None
    except OSError as e:
        raise SourceError(f"cannot read data file {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise SourceError(f"data file {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"data file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _source_path(source: str) -> Path:
    return Path(source.partition(":")[2]).expanduser()


def _file_rows(source: str, field: str) -> list[str]:
    kind = source.partition(":")[0]
    p = _source_path(source)
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
        except RecursionError:
            raise SourceError(f"{p}:{i}: not valid JSON (nested too deep)") from None
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
        all_rows = _file_rows(source, field)
        rows = all_rows if split == "test" else _split_rows(all_rows, split)
        if not any(r.strip() for r in rows):
            raise SourceError(f"{_source_path(source)}: no text in its {split} split ({len(all_rows)} rows in "
                              "the file; train and heldout are its first 90% and last 10%)")
        return "\n\n".join(rows)
    raise SourceError(f"unknown data source '{source}'")


# -- keeping evaluation data unseen --------------------------------------------------------------

TRAIN_SPLITS: tuple[Split, ...] = ("train", "heldout")


def source_file(source: str, split: Split) -> Path | None:
    """The local file ``split`` of ``source`` is read from; None when it comes from the hub."""
    if source.startswith(("text:", "jsonl:")):
        return _source_path(source)
    if source == "wikitext2":
        d = _wikitext2_dir()
        return None if d is None else _wikitext2_file(d, split)
    return None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_file(a: Path, b: Path) -> str | None:
    """Why ``a`` and ``b`` hold the same bytes ("both are /x", "/x is a copy of /y"), or None. Compares resolved paths (``..``, symlinks), then (st_dev, st_ino) (hard links),
    then a SHA-256 of equal-sized files (copies); files that do not exist compare by path only."""
    ra, rb = a.resolve(), b.resolve()
    if ra == rb:
        return f"both are {ra}"
    try:
        sa, sb = ra.stat(), rb.stat()
    except OSError:
        return None
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):
        return None
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return f"{ra} is a hard link to {rb}"
    try:
        if sa.st_size == sb.st_size and _digest(ra) == _digest(rb):
            return f"{ra} is a copy of {rb}"
    except OSError:
        return None  # unreadable here: loading it reports that
    return None


def same_data(train_source: str, eval_source: str) -> str | None:
    """Why training on ``train_source`` (its train and heldout splits) would read the test split
    of ``eval_source``, or None. ``text:`` and ``jsonl:`` of one file are the same data."""
    if train_source == eval_source == "wikitext2":
        return None  # its splits are separate files (or separate parts of one), see wikitext2_rows
    test = source_file(eval_source, "test")
    if test is None:
        return None
    for split in TRAIN_SPLITS:
        f = source_file(train_source, split)
        why = same_file(f, test) if f is not None else None
        if why:
            return why
    return None


def check_unseen(train_source: str, eval_source: str, what: str) -> None:
    """Refuse to load ``what`` (calibration, fine-tuning) data that is the evaluation data; the
    recipe check may have run before the file existed."""
    why = same_data(train_source, eval_source)
    if why:
        raise SourceError(f"{what} data '{train_source}' is the evaluation data '{eval_source}' ({why}); "
                          "use different files to keep evaluation data unseen")


def check_recipe_unseen(recipe: Any) -> None:
    """Every stage's training data (calibration, fine-tuning) is not the evaluation data; run before
    each stage, since a file may be created or replaced between stages."""
    ev = recipe.stages.evaluate.data.source
    check_unseen(recipe.stages.calibrate.data.source, ev, "calibration")
    if recipe.stages.finetune.enabled:
        check_unseen(recipe.stages.finetune.data.source, ev, "fine-tuning")


def check_recipe_data(recipe: Any, missing_ok: bool = False) -> None:
    """Fail before anything starts: every local data file the recipe reads is readable UTF-8 text
    (JSON lines with the field, for ``jsonl:``), and no training data is the evaluation data.
    ``missing_ok``: a file that does not exist yet is checked when its stage loads it."""
    st = recipe.stages
    refs = [st.calibrate.data, st.evaluate.data] + ([st.finetune.data] if st.finetune.enabled else [])
    for ref in refs:
        if not ref.source.startswith(("text:", "jsonl:")):
            continue
        if missing_ok and not _source_path(ref.source).exists():
            continue
        _file_rows(ref.source, ref.field)
    check_recipe_unseen(recipe)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once with the tokenizer's defaults; returns a 1-D LongTensor."""
    import torch

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
    import torch

    if ids.numel() <= seqlen:
        raise SourceError(f"calibration text has {ids.numel()} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
