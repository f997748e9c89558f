"""Text sources, data mixtures, calibration windows and the evaluation token stream.

Splits: ``train`` (calibration, fine-tuning), ``heldout`` (search objectives, fine-tuning
validation) and ``test`` (evaluation only). WikiText-2 is read from ``$PQFLOW_DATA_DIR``
(``wikitext-2-raw/wiki.*.raw``) when set, else from the hub dataset. Offline there is no train
split: ``train`` is the first 90% of the valid split and ``heldout`` its last 10%, so neither
overlaps ``test``. The built-in corpora (``python-docstrings``, ``python-reference``) are
described in :mod:`pqflow.corpora`.

A data setting (:class:`pqflow.recipe.DataRef`) is one source or a weighted mixture of up to 16;
:func:`mixture_windows` and :func:`mixture_eval_windows` draw windows from every part by weight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pqflow import corpora
from pqflow.errors import SourceError

if TYPE_CHECKING:  # torch is imported where windows are built: recipe validation uses this module too
    import torch

    from pqflow.recipe import DataPart, DataRef

Split = Literal["train", "heldout", "test"]
Layout = Literal["raw", "lines"]
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


def _raw_lines(raw: str) -> list[str]:
    """The lines of ``raw``, each with its "\\n" (the last one without, when the file lacks it)."""
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def _raw_text(source: str, split: Split) -> str:
    # `raw` layout: the file exactly as it reads; train and heldout cut it at a line boundary, so
    # train + heldout == test.
    raw = _read(_source_path(source))
    if split == "test":
        return raw
    lines = _raw_lines(raw)
    text = "".join(_split_rows(lines, split))
    if not text.strip():
        raise SourceError(f"{_source_path(source)}: no text in its {split} split ({len(lines)} lines in "
                          "the file; train and heldout are its first 90% and last 10%)")
    return text


def _corpus_text(source: str, split: Split) -> str:
    if split == "test":
        return corpora.corpus_text(source)
    return "\n\n".join(_split_rows(corpora.corpus_paragraphs(source), split))


def load_text(source: str, split: Split, field: str = "text", layout: Layout = "raw") -> str:
    """The text of ``split``. For local files and the built-in corpora, ``test`` is the whole text
    and ``train`` / ``heldout`` are its first 90% / last 10% of lines (``text:``), documents
    (``jsonl:``) or paragraphs (corpora). ``layout`` applies to ``text:`` files: ``raw`` reads the
    file as it is, ``lines`` drops blank lines and separates the others by one blank line."""
    if source == "wikitext2":
        return "\n\n".join(wikitext2_rows(split))
    if source in corpora.CORPORA:
        return _corpus_text(source, split)
    if source.startswith("text:") and layout == "raw":
        return _raw_text(source, split)
    if source.startswith(("text:", "jsonl:")):
        all_rows = _file_rows(source, field)
        rows = all_rows if split == "test" else _split_rows(all_rows, split)
        if not any(r.strip() for r in rows):
            raise SourceError(f"{_source_path(source)}: no text in its {split} split ({len(all_rows)} rows in "
                              "the file; train and heldout are its first 90% and last 10%)")
        return "\n\n".join(rows)
    raise SourceError(f"unknown data source '{source}'")


def load_part(part: DataPart, split: Split) -> str:
    """The text of one mixture part's ``split``."""
    return load_text(part.source, split, part.field, part.layout)


def part_texts(ref: DataRef, split: Split) -> list[tuple[DataPart, str]]:
    """Every part of ``ref`` with the text of its ``split`` (a single source is one part)."""
    return [(p, load_part(p, split)) for p in ref.parts()]


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
    of ``eval_source``, or None. ``text:`` and ``jsonl:`` of one file are the same data, and so is
    a built-in corpus with itself (its test split is the whole text)."""
    if train_source == eval_source == "wikitext2":
        return None  # its splits are separate files (or separate parts of one), see wikitext2_rows
    if train_source == eval_source and train_source in corpora.CORPORA:
        return f"the built-in corpus {train_source}: its test split is the whole text, train and heldout included"
    test = source_file(eval_source, "test")
    if test is None:
        return None
    for split in TRAIN_SPLITS:
        f = source_file(train_source, split)
        why = same_file(f, test) if f is not None else None
        if why:
            return why
    return None


def _advice(source: str) -> str:
    return ("use another source to keep evaluation data unseen" if source in corpora.CORPORA
            else "use different files to keep evaluation data unseen")


def check_unseen(train_source: str, eval_source: str, what: str) -> None:
    """Refuse to load ``what`` (calibration, fine-tuning) data that is the evaluation data; the
    recipe check may have run before the file existed."""
    why = same_data(train_source, eval_source)
    if why:
        raise SourceError(f"{what} data '{train_source}' is the evaluation data '{eval_source}' ({why}); "
                          f"{_advice(train_source)}")


@dataclass(frozen=True)
class Leak:
    """A training part (``train_key`` reads ``train_source``) that is evaluation data."""

    train_key: str
    train_source: str
    eval_key: str
    eval_source: str
    why: str

    def message(self, n: int = 200) -> str:
        def short(s: str) -> str:
            return s if len(s) <= n else s[: n - 3] + "..."

        return (f"{self.train_key} '{short(self.train_source)}' is the evaluation data {self.eval_key} "
                f"'{short(self.eval_source)}' ({self.why}); {_advice(self.train_source)}")


def _keyed_parts(key: str, data: Any) -> list[tuple[str, Any]]:
    """(dotted key of its ``source``, part) of every part of a data setting: its ``mix`` parts,
    or the setting itself. Works on any object with ``source`` (and optionally ``mix``)."""
    mix = getattr(data, "mix", None)
    if mix:
        return [(f"{key}.mix.{i}.source", p) for i, p in enumerate(mix)]
    return [(f"{key}.source", data)]


def evaluation_data(recipe: Any) -> list[tuple[str, Any]]:
    """(dotted key, data setting) of everything the evaluate stage scores: ``data`` and, when the
    recipe has them, ``datasets``."""
    ev = recipe.stages.evaluate
    extra = getattr(ev, "datasets", None) or []
    return [("stages.evaluate.data", ev.data)] + [(f"stages.evaluate.datasets.{i}", d) for i, d in enumerate(extra)]


def find_leaks(train_key: str, train: Any, evaluation: Sequence[tuple[str, Any]]) -> list[Leak]:
    """Every (training part, evaluation part) pair of ``train`` (a data setting at ``train_key``)
    and the evaluation data that are the same data (:func:`same_data`)."""
    leaks = []
    for tkey, tpart in _keyed_parts(train_key, train):
        for ekey_base, edata in evaluation:
            for ekey, epart in _keyed_parts(ekey_base, edata):
                why = same_data(tpart.source, epart.source)
                if why:
                    leaks.append(Leak(tkey, tpart.source, ekey, epart.source, why))
    return leaks


def check_data_unseen(recipe: Any, train_key: str, what: str) -> None:
    """Refuse to load ``what`` (calibration, fine-tuning) data, the setting at ``train_key``
    (``stages.calibrate.data``), when any of its parts is any evaluation data; run when the stage
    loads it, since the recipe check may have run before a file existed."""
    stage = train_key.split(".")[1]
    leaks = find_leaks(train_key, recipe.stage(stage).data, evaluation_data(recipe))
    if leaks:
        raise SourceError(f"{what} data: {leaks[0].message()}")


def check_recipe_unseen(recipe: Any) -> None:
    """Every stage's training data (calibration, fine-tuning) is not the evaluation data; run before
    each stage, since a file may be created or replaced between stages."""
    check_data_unseen(recipe, "stages.calibrate.data", "calibration")
    if recipe.stages.finetune.enabled:
        check_data_unseen(recipe, "stages.finetune.data", "fine-tuning")


def check_recipe_data(recipe: Any, missing_ok: bool = False) -> None:
    """Fail before anything starts: every local data file the recipe reads is readable UTF-8 text
    (JSON lines with the field, for ``jsonl:``), and no training data is the evaluation data.
    ``missing_ok``: a file that does not exist yet is checked when its stage loads it."""
    st = recipe.stages
    settings = [("stages.calibrate.data", st.calibrate.data), *evaluation_data(recipe)]
    if st.finetune.enabled:
        settings.append(("stages.finetune.data", st.finetune.data))
    for key, data in settings:
        for _, part in _keyed_parts(key, data):
            if not part.source.startswith(("text:", "jsonl:")):
                continue
            if missing_ok and not _source_path(part.source).exists():
                continue
            _file_rows(part.source, getattr(part, "field", "text"))
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


# -- mixtures ------------------------------------------------------------------------------------


def split_counts(weights: Sequence[float], n: int) -> list[int]:
    """``n`` split by ``weights`` (largest remainder: every count is within 1 of its exact share,
    ties to the earlier part)."""
    total = math.fsum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def interleave(counts: Sequence[int], seed: int | None = None) -> list[int]:
    """The part of each position of a sequence holding ``counts[i]`` items of part ``i``: each step
    takes the part furthest behind its share, so every prefix follows the counts' proportions
    (within one item per part). Ties go to a seeded random order of the parts (``seed``) or to the
    earlier part (``None``)."""
    m, n = len(counts), sum(counts)
    if seed is None:
        rank = list(range(m))
    else:
        import torch

        rank = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).tolist()
    taken = [0] * m
    order = []
    for t in range(1, n + 1):
        # Integer deficits (scaled by n): exact ties, no float noise.
        i = max((i for i in range(m) if taken[i] < counts[i]), key=lambda i: (t * counts[i] - n * taken[i], -rank[i]))
        taken[i] += 1
        order.append(i)
    return order


def _stack_in_order(chunks: list[torch.Tensor], order: list[int]) -> torch.Tensor:
    import torch

    next_row = [0] * len(chunks)
    rows = []
    for i in order:
        rows.append(chunks[i][next_row[i]])
        next_row[i] += 1
    return torch.stack(rows)


def _part_error(part: Any, e: SourceError) -> SourceError:
    return SourceError(f"data part '{part.source}': {e}")


@dataclass
class Drawn:
    """Windows drawn from a mixture and what each part gave: ``parts[i]`` holds the part's
    ``source``, ``field``, ``layout``, ``weight``, ``windows`` and ``split_tokens``."""

    windows: torch.Tensor
    parts: list[dict[str, Any]]


def _part_record(part: Any, windows: int, split_tokens: int) -> dict[str, Any]:
    return {"source": part.source, "field": part.field, "layout": part.layout, "weight": part.weight,
            "windows": windows, "split_tokens": split_tokens}


def draw_windows(tokenizer, texts: Sequence[tuple[DataPart, str]], n: int, seqlen: int, seed: int) -> Drawn:
    """:func:`mixture_windows` from texts already loaded (:func:`part_texts`)."""
    ids = [tokenize(tokenizer, text) for _, text in texts]
    if len(texts) == 1:
        w = sample_windows(ids[0], n, seqlen, seed)
        return Drawn(w, [_part_record(texts[0][0], n, ids[0].numel())])
    counts = split_counts([p.weight for p, _ in texts], n)
    chunks = []
    for i, ((part, _), part_ids, c) in enumerate(zip(texts, ids, counts, strict=True)):
        try:
            # Part i draws with seed + i: two parts of one text still get different windows.
            chunks.append(sample_windows(part_ids, c, seqlen, seed + i) if c else part_ids[:0])
        except SourceError as e:
            raise _part_error(part, e) from None
    windows = _stack_in_order(chunks, interleave(counts, seed))
    return Drawn(windows, [_part_record(p, c, t.numel()) for (p, _), c, t in zip(texts, counts, ids, strict=True)])


def mixture_windows(tokenizer, ref: DataRef, split: Split, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` random windows ``[n, seqlen]`` of ``ref``'s ``split``: each part gives its share of
    ``n`` by weight (largest remainder), drawn with :func:`sample_windows`, and the parts are
    interleaved (:func:`interleave`) so that any prefix ``windows[:k]`` follows the weights too.
    A single source gives exactly ``sample_windows(tokenize(text), n, seqlen, seed)``."""
    return draw_windows(tokenizer, part_texts(ref, split), n, seqlen, seed).windows


def _feasible_total(available: Sequence[int], weights: Sequence[float], cap: int) -> int:
    """The largest total <= ``cap`` whose split by weight fits every part's available windows."""
    total = math.fsum(weights)
    n = min(cap, min(math.floor(a * total / w) for a, w in zip(available, weights, strict=True)))
    while n > 0 and any(c > a for c, a in zip(split_counts(weights, n), available, strict=True)):
        n -= 1
    return n


def draw_eval_windows(tokenizer, texts: Sequence[tuple[DataPart, str]], seqlen: int, n: int | None) -> Drawn:
    """:func:`mixture_eval_windows` from texts already loaded (:func:`part_texts`)."""
    ids = [tokenize(tokenizer, text) for _, text in texts]
    if len(texts) == 1:
        w = eval_windows(ids[0], seqlen, n)
        return Drawn(w, [_part_record(texts[0][0], len(w), ids[0].numel())])
    available = []
    for (part, _), part_ids in zip(texts, ids, strict=True):
        if part_ids.numel() < seqlen:
            raise _part_error(part, SourceError(f"text has {part_ids.numel()} tokens, fewer than one window of {seqlen}"))
        available.append(part_ids.numel() // seqlen)
    weights = [p.weight for p, _ in texts]
    counts = split_counts(weights, _feasible_total(available, weights, sum(available) if n is None else n))
    chunks = [t[: c * seqlen].view(c, seqlen) for t, c in zip(ids, counts, strict=True)]
    windows = _stack_in_order(chunks, interleave(counts))
    return Drawn(windows, [_part_record(p, c, t.numel()) for (p, _), c, t in zip(texts, counts, ids, strict=True)])


def mixture_eval_windows(tokenizer, ref: DataRef, split: Split, seqlen: int, n: int | None) -> torch.Tensor:
    """Non-overlapping windows ``[m, seqlen]`` from the start of each part of ``ref``'s ``split``,
    interleaved, counts by weight: ``n`` in all (``None``: as many as the parts hold at their
    weights), fewer when a part runs out first, so the weights always hold. A single source gives
    exactly ``eval_windows(tokenize(text), seqlen, n)``."""
    return draw_eval_windows(tokenizer, part_texts(ref, split), seqlen, n).windows


def describe(drawn: Drawn) -> str:
    """'wikitext2 64, python-docstrings 64': windows per part, for progress lines."""
    return ", ".join(f"{p['source']} {p['windows']}" for p in drawn.parts)
