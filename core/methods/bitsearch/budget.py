"""Keep allocations inside the byte budget, and spend what is left of it.

Both moves are greedy on a *damage* table ``d[unit, choice]`` (expected objective increase, lower
is better): ``repair`` downgrades the unit that loses least per byte saved until the allocation
fits; ``fill`` upgrades the unit that gains most per byte spent while an upgrade still fits. A
prior allocation is ``fill`` from the cheapest allocation; a search candidate over the budget is
``repair``-ed, then ``fill``-ed, so every evaluated allocation uses the budget nearly fully and
no evaluation is wasted on one that would not fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pqflow.methods.bitsearch.space import Allocation, SearchSpace

_EPS = 1e-12


def repair(space: SearchSpace, alloc: Sequence[int], budget: int, damage: np.ndarray) -> Allocation:
    """The allocation with some units moved to cheaper choices so that it fits ``budget``."""
    a = np.asarray(alloc, dtype=np.int64).copy()
    total = space.bytes_of(a)
    rows = np.arange(space.n_units)
    while total > budget:
        cur_cost = space.cost[rows, a][:, None]
        cur_dmg = damage[rows, a][:, None]
        saved = cur_cost - space.cost  # [units, choices]
        loss = np.maximum(damage - cur_dmg, 0.0)
        ok = saved > 0
        if not ok.any():
            raise ValueError(f"no allocation fits {budget} B")
        # Prefer a move that alone fits the budget with least damage; else the best loss per byte.
        enough = ok & (total - saved <= budget)
        if enough.any():
            score = np.where(enough, loss, np.inf)
        else:
            score = np.where(ok, loss / np.maximum(saved, 1), np.inf)
        u, c = np.unravel_index(int(np.argmin(score)), score.shape)
        total -= int(saved[u, c])
        a[u] = c
    return tuple(int(x) for x in a)


def fill(space: SearchSpace, alloc: Sequence[int], budget: int, damage: np.ndarray) -> Allocation:
    """Upgrade units greedily (best damage reduction per extra byte) while an upgrade fits."""
    a = np.asarray(alloc, dtype=np.int64).copy()
    total = space.bytes_of(a)
    rows = np.arange(space.n_units)
    while True:
        extra = space.cost - space.cost[rows, a][:, None]
        gain = damage[rows, a][:, None] - damage
        ok = (extra > 0) & (gain > _EPS) & (total + extra <= budget)
        if not ok.any():
            return tuple(int(x) for x in a)
        score = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        u, c = np.unravel_index(int(np.argmax(score)), score.shape)
        total += int(extra[u, c])
        a[u] = c


def fit(space: SearchSpace, alloc: Sequence[int], budget: int, damage: np.ndarray, spend: bool = True
        ) -> Allocation:
    """``repair`` then (when ``spend``) ``fill``: a candidate that fits and wastes little budget."""
    a = repair(space, alloc, budget, damage)
    return fill(space, a, budget, damage) if spend else a


def greedy(space: SearchSpace, budget: int, damage: np.ndarray) -> Allocation:
    """The prior allocation: everything at the cheapest choice, then filled to the budget."""
    return fill(space, (0,) * space.n_units, budget, damage)
