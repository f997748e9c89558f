"""Every evaluated allocation, cached by allocation, and the Pareto front of bytes vs objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqflow.methods.bitsearch.evaluator import Measure
from pqflow.methods.bitsearch.space import Allocation, SearchSpace


@dataclass
class Trial:
    index: int
    alloc: Allocation
    bytes: int
    avg_bits: float
    objective: float
    nll: float
    kl: float | None
    seconds: float
    source: str

    def to_json(self, space: SearchSpace) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "bytes": self.bytes, "avg_bits": self.avg_bits,
                "objective": self.objective, "nll": self.nll, "kl": self.kl, "seconds": self.seconds,
                "allocation": space.labels(self.alloc)}


class Trials:
    """Evaluates allocations once each; a repeated allocation returns its first result."""

    def __init__(self, space: SearchSpace, measure: Callable[[Allocation], Measure]) -> None:
        self.space = space
        self._measure = measure
        self.records: list[Trial] = []
        self._by_alloc: dict[Allocation, Trial] = {}
        self.hits = 0

    def __contains__(self, alloc: Allocation) -> bool:
        return tuple(alloc) in self._by_alloc

    def __len__(self) -> int:
        return len(self.records)

    def evaluate(self, alloc: Allocation, source: str) -> Trial:
        alloc = tuple(int(x) for x in alloc)
        hit = self._by_alloc.get(alloc)
        if hit is not None:
            self.hits += 1
            return hit
        return self.record(alloc, self._measure(alloc), source)

    def record(self, alloc: Allocation, m: Measure, source: str) -> Trial:
        alloc = tuple(int(x) for x in alloc)
        t = Trial(len(self.records), alloc, self.space.bytes_of(alloc), self.space.avg_bits(alloc),
                  m.objective, m.nll, m.kl, m.seconds, source)
        self.records.append(t)
        self._by_alloc[alloc] = t
        return t

    def best(self, budget: int | None = None) -> Trial:
        ok = [t for t in self.records if budget is None or t.bytes <= budget]
        if not ok:
            raise ValueError("no trial within the budget")
        return min(ok, key=lambda t: (t.objective, t.bytes, t.index))

    def pareto(self) -> list[Trial]:
        """Trials no other trial beats on both bytes and objective, by increasing bytes."""
        front: list[Trial] = []
        for t in sorted(self.records, key=lambda t: (t.bytes, t.objective, t.index)):
            if not front or t.objective < front[-1].objective:
                front.append(t)
        return front
