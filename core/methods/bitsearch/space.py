"""The search space: which units get a precision, which precisions exist, and what each costs.

A *unit* is a decoder layer (all its linears share one choice) or a single linear, as the recipe
says. An allocation is a tuple of choice indices, one per unit. Choices are sorted by the bytes
they cost across the model, so a higher index means more bytes (and, in practice, less error);
optimizers that mutate to neighbouring indices then move along the quality/size axis.

Bytes are those the ``quantize`` stage stores: :func:`pqflow.quant.packed_bytes` for packed
modules (codes, fp16 scales, uint8 zeros, bias) and fp16 for a module kept in floating point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pqflow import architectures
from pqflow.calibration import decoder_linears
from pqflow.errors import RecipeError
from pqflow.quant import packed_bytes
from pqflow.quant.packing import SUPPORTED_BITS

KEEP_BITS = 16  # the allocation value that leaves a module in floating point (stored as fp16)
FLOAT_BYTES = 2
Allocation = tuple[int, ...]
_CHOICE = re.compile(r"^(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<pc>pc))?$")


@dataclass(frozen=True)
class Choice:
    """One precision: ``bits`` with groups of ``group_size`` input columns (None = per row)."""

    bits: int
    group_size: int | None = None

    @property
    def label(self) -> str:
        if self.bits == KEEP_BITS:
            return "16"
        return f"{self.bits}pc" if self.group_size is None else f"{self.bits}g{self.group_size}"

    def entry(self, symmetric: bool) -> dict[str, Any]:
        """This choice as an ``allocation.json`` module entry."""
        if self.bits == KEEP_BITS:
            return {"bits": KEEP_BITS}
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": symmetric}


def parse_choice(text: str) -> Choice:
    """``"4g64"`` (4 bits, groups of 64), ``"3pc"`` (per output row), ``"16"`` (kept in fp16)."""
    m = _CHOICE.match(str(text).strip())
    if not m:
        raise RecipeError(f"bit choice '{text}': expected '<bits>g<group>', '<bits>pc' or '16'")
    bits = int(m["bits"])
    if bits == KEEP_BITS:
        if m["group"] or m["pc"]:
            raise RecipeError(f"bit choice '{text}': 16 (keep) takes no group size")
        return Choice(KEEP_BITS)
    if bits not in SUPPORTED_BITS:
        raise RecipeError(f"bit choice '{text}': bits must be one of {SUPPORTED_BITS} or 16")
    if m["group"] is None and m["pc"] is None:
        raise RecipeError(f"bit choice '{text}': say the group size ('{bits}g64') or per-row ('{bits}pc')")
    group = int(m["group"]) if m["group"] else None
    if group is not None and group <= 0:
        raise RecipeError(f"bit choice '{text}': group size must be positive")
    return Choice(bits, group)


def module_bytes(out_features: int, in_features: int, choice: Choice, symmetric: bool, bias: bool) -> int:
    """Bytes one linear occupies in the quantized artifact under ``choice``."""
    if choice.bits == KEEP_BITS:
        return (out_features * in_features + (out_features if bias else 0)) * FLOAT_BYTES
    return packed_bytes(out_features, in_features, choice.bits, choice.group_size, torch.float16, symmetric, bias)


def layer_of(module: str) -> str:
    """The decoder block (its module name) that ``module`` lies in."""
    block = architectures.block_of(module)
    if block is None:
        raise ValueError(f"{module} is not inside a decoder layer")
    return block


@dataclass
class SearchSpace:
    modules: list[str]  # every decoder linear, in model order
    shapes: dict[str, tuple[int, int, bool]]  # out, in, bias
    units: list[str]  # layer prefixes or module names
    unit_modules: list[list[str]]
    choices: list[Choice]  # ascending in model-wide bytes
    symmetric: bool
    cost: np.ndarray  # [n_units, n_choices] bytes
    granularity: str = "linear"

    @classmethod
    def build(cls, model: nn.Module, granularity: str, choices: Sequence[Choice], symmetric: bool = False,
              tie: Callable[[str], str] | None = None) -> SearchSpace:
        """``tie``: module name -> unit name, for linears that must share a scheme (an engine's
        fused attention inputs, MLP gate and up, MoE experts) when the granularity is ``linear``."""
        linears = decoder_linears(model)
        if not linears:
            raise ValueError("the model has no decoder linears to allocate bits to")
        shapes = {n: (m.out_features, m.in_features, m.bias is not None) for n, m in linears.items()}
        modules = list(linears)
        if granularity == "layer":
            units = list(dict.fromkeys(layer_of(n) for n in modules))
            unit_modules = [[n for n in modules if layer_of(n) == u] for u in units]
        elif granularity == "linear":
            key = tie or (lambda n: n)
            units = list(dict.fromkeys(key(n) for n in modules))
            unit_modules = [[n for n in modules if key(n) == u] for u in units]
        else:
            raise RecipeError(f"granularity '{granularity}': expected 'layer' or 'linear'")
        uniq = list(dict.fromkeys(choices))
        if not uniq:
            raise RecipeError("bit choices: at least one is needed")
        per_choice = [sum(module_bytes(*shapes[n][:2], c, symmetric, shapes[n][2]) for n in modules) for c in uniq]
        ordered = [c for _, c in sorted(zip(per_choice, uniq, strict=True), key=lambda t: (t[0], t[1].bits))]
        cost = np.array([[sum(module_bytes(*shapes[n][:2], c, symmetric, shapes[n][2]) for n in mods)
                          for c in ordered] for mods in unit_modules], dtype=np.int64)
        return cls(modules, shapes, units, unit_modules, ordered, symmetric, cost, granularity)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_weights(self) -> int:
        return sum(o * i for o, i, _ in self.shapes.values())

    def bytes_of(self, alloc: Sequence[int]) -> int:
        return int(self.cost[np.arange(self.n_units), np.asarray(alloc)].sum())

    def avg_bits(self, alloc: Sequence[int]) -> float:
        """Bits per weight of the decoder linears, scales, zeros and biases included."""
        return 8 * self.bytes_of(alloc) / self.n_weights

    def budget(self, avg_bits: float | None, budget_bytes: int | None) -> int:
        """The byte budget of the decoder linears from either form the recipe gives."""
        if (avg_bits is None) == (budget_bytes is None):
            raise RecipeError("stages.bit_search: give exactly one of avg_bits and budget_bytes")
        b = budget_bytes if budget_bytes is not None else int(avg_bits * self.n_weights // 8)
        low = int(self.cost[:, 0].sum())
        if b < low:
            raise RecipeError(
                f"stages.bit_search: budget {b} B ({8 * b / self.n_weights:.3f} bits) is below the smallest "
                f"allocation ({low} B, {8 * low / self.n_weights:.3f} bits, all '{self.choices[0].label}')")
        return b

    def uniform(self, choice: Choice) -> Allocation:
        return (self.choices.index(choice),) * self.n_units

    def module_choices(self, alloc: Sequence[int]) -> dict[str, Choice]:
        return {m: self.choices[c] for mods, c in zip(self.unit_modules, alloc, strict=True) for m in mods}

    def labels(self, alloc: Sequence[int]) -> list[str]:
        return [self.choices[c].label for c in alloc]

    def from_labels(self, labels: Sequence[str]) -> Allocation:
        idx = {c.label: i for i, c in enumerate(self.choices)}
        return tuple(idx[x] for x in labels)

    def allocation_json(self, alloc: Sequence[int], **extra: Any) -> dict[str, Any]:
        """The ``allocation.json`` document ``quantize`` reads (``modules`` + descriptive fields)."""
        mods = {m: c.entry(self.symmetric) for m, c in self.module_choices(alloc).items()}
        return {"modules": mods, "bytes": self.bytes_of(alloc), "avg_bits": self.avg_bits(alloc),
                "granularity": self.granularity,
                "units": dict(zip(self.units, self.labels(alloc), strict=True)), **extra}
