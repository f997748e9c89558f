"""What the fine-tuning methods share: the input model with its artifact format, the result, and
copying an unchanged base into the output artifact."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pqflow.formats.lora import ADAPTER_DIR
from pqflow.formats.lora import NAME as FORMAT
from pqflow.methods.tuning.train import History
from pqflow.models import MODEL_META

__all__ = ["ADAPTER_DIR", "FORMAT", "Base", "Tuned", "copy_base_files", "trainable_parameters"]
_NOT_BASE = {MODEL_META, "manifest.json"}


@dataclass
class Base:
    """The model to tune. ``meta`` is the input artifact's ``pqflow_model.json`` (``{"format":
    "hf"}`` for a source model) and ``folder`` its files (None for a source model)."""

    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    folder: Path | None = None

    @property
    def fmt(self) -> str:
        return str(self.meta.get("format", "hf"))


@dataclass
class Tuned:
    """A tuned model already written to the output folder; ``model`` is the in-memory object
    whose perplexity the stage reports (it must equal what the artifact reloads to)."""

    model: nn.Module
    history: History
    trainable_params: int
    info: dict[str, Any] = field(default_factory=dict)


def copy_base_files(src: Path, out: Path) -> None:
    """Copy an input artifact's files byte for byte (its manifest and model meta excepted)."""
    from pqflow.models import listed_files

    listed = listed_files(Path(src))
    found = sorted(Path(src).rglob("*")) if listed is None else [Path(src) / rel for rel in listed]
    for p in found:
        rel = p.relative_to(src)
        if p.is_dir() or rel.name in _NOT_BASE and len(rel.parts) == 1:
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
