"""Depth pruning: remove whole decoder layers, the lowest layer scores first (block influence from
``cosine-layer`` is the score this is meant for)."""

from __future__ import annotations

from pqflow.errors import PqflowError
from pqflow.methods.importance.common import LayerGeometry, Scores
from pqflow.methods.prune.common import CommonParams, prunable_layers
from pqflow.methods.prune.plan import PrunePlan


class Params(CommonParams):
    pass


def choose_layers(geos: list[LayerGeometry], scores: Scores, target: int, p: CommonParams) -> list[int]:
    """Lowest-scoring prunable layers whose parameters add up closest to ``target``."""
    candidates = sorted(prunable_layers(len(geos), p), key=lambda i: float(scores.layer[i]))
    drop: list[int] = []
    removed = 0
    for i in candidates:
        if removed + geos[i].params / 2 > target:
            break
        drop.append(i)
        removed += geos[i].params
    if len(drop) >= len(geos):
        raise PqflowError("depth pruning would remove every decoder layer")
    return sorted(drop)


def plan(geos: list[LayerGeometry], scores: Scores, target: int, p: Params) -> PrunePlan:
    return PrunePlan(drop=choose_layers(geos, scores, target, p))
