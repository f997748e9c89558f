"""Built-in offline corpora: technical English prose that every Python installation carries.

``python-reference``
    The texts of ``pydoc_data.topics`` (the Language Reference topics that ``help()`` shows,
    generated from CPython's documentation and shipped with every CPython), keys sorted, joined
    by blank lines: 465,047 characters (2,608 paragraphs) on CPython 3.11.7. The evaluation's
    second domain, not meant for calibration or tuning: a recipe that trains on it and also
    evaluates on it is refused (:func:`pqflow.data.same_data`).
``python-docstrings``
    The docstrings (module, class, function) of the running CPython's pure-Python standard
    library, read with :mod:`ast` (nothing is imported), in sorted file order; ``test``,
    ``tests``, ``idlelib``, ``tkinter``, ``lib2to3``, ``site-packages`` and ``dist-packages``
    folders are skipped, and so are files that cannot be read or parsed: 1,522,526 characters
    (13,473 paragraphs from 587 files) on CPython 3.11.7. A calibration and tuning domain.

The two are disjoint: both describe Python, and some docstring paragraphs (pdb's command help,
"For example:") also appear in the reference text, so every docstring paragraph whose text
(whitespace collapsed) occurs anywhere in ``python-reference`` is removed from
``python-docstrings`` (47 paragraphs on 3.11.7). Tuning on the docstrings never reads a
paragraph of the evaluation text.

Both texts are paragraphs separated by blank lines; as for local files, split ``test`` is the
whole text and ``train`` / ``heldout`` its first 90% / last 10% of paragraphs. They depend only
on the Python installation (same version and build: same text) and are built once per process.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path

from pqflow.errors import SourceError

REFERENCE = "python-reference"
DOCSTRINGS = "python-docstrings"
CORPORA = (DOCSTRINGS, REFERENCE)

# Folders of the standard library that are not library prose: test suites (their docstrings
# describe tests), the IDLE and Tk GUIs, the retired 2to3 and installed third-party packages.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "dist-packages",
                       "__pycache__"})
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text``: blocks separated by blank lines, trailing whitespace removed
    (the first line's indentation, e.g. of a code example, is kept)."""
    return [p for p in (b.strip("\n").rstrip() for b in _PARAGRAPH_BREAK.split(text)) if p.strip()]


@lru_cache(maxsize=1)
def python_reference() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SourceError(f"built-in corpus {REFERENCE}: this Python installation has no pydoc_data.topics") from None
    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics))


def _stdlib_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):  # does not follow symlinked folders
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of the module and of every class and function, in source order."""
    out = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        # Only statement bodies can hold a class or function definition.
        stack.extend(reversed([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]))
    return out


def _file_docstrings(path: Path) -> list[str]:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():  # invalid escape sequences in old modules
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return _docstrings(tree)


def _normal(text: str) -> str:
    return " ".join(text.split())


class _Occurrences:
    """Whether a paragraph's whitespace-collapsed text occurs in a reference text, fast: a
    paragraph holds no blank line, so it can only occur inside one reference paragraph, and
    every word but its first and last (which may match part of a word) is a whole word there."""

    def __init__(self, reference: str) -> None:
        self.paras = [_normal(p) for p in paragraphs(reference)]
        self.joined = "\n".join(self.paras)
        self.index: dict[str, set[int]] = {}
        for i, p in enumerate(self.paras):
            for w in set(p.split(" ")):
                self.index.setdefault(w, set()).add(i)

    def __call__(self, paragraph: str) -> bool:
        text = _normal(paragraph)
        inner = text.split(" ")[1:-1]
        if not inner:
            return text in self.joined
        postings = sorted((self.index.get(w, set()) for w in set(inner)), key=len)
        candidates = set(postings[0]).intersection(*postings[1:])
        return any(text in self.paras[i] for i in candidates)


@lru_cache(maxsize=1)
def python_docstrings() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    occurs = _Occurrences(python_reference())
    seen: dict[str, bool] = {}
    kept = []
    for path in _stdlib_files(root):
        for doc in _file_docstrings(path):
            for p in paragraphs(doc):
                if p not in seen:
                    seen[p] = occurs(p)
                if not seen[p]:
                    kept.append(p)
    if not kept:
        raise SourceError(f"built-in corpus {DOCSTRINGS}: no docstrings found in the standard library at {root}")
    return "\n\n".join(kept)


def corpus_text(name: str) -> str:
    """The whole text of built-in corpus ``name`` (split ``test``)."""
    return {REFERENCE: python_reference, DOCSTRINGS: python_docstrings}[name]()


@lru_cache(maxsize=len(CORPORA))
def corpus_paragraphs(name: str) -> list[str]:
    """The paragraphs of built-in corpus ``name``; train / heldout are its first 90% / last 10%."""
    return paragraphs(corpus_text(name))
