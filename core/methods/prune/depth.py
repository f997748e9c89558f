"""Depth pruning: remove whole decoder layers, the lowest layer scores first (block influence from
``cosine-layer`` is the score this is meant for)."""

from __future__ import annotations

from typing import Any

from pqflow.architectures import LAYER_DROPPING, LayerGeometry
from pqflow.errors import PqflowError
from pqflow.methods.importance.common import Scores
from pqflow.methods.prune.common import CommonParams, prunable_layers, require_all
from pqflow.methods.prune.plan import PrunePlan


class Params(CommonParams):
    pass


def needs(p: Params) -> set[str]:
    """The adapter capabilities these parameters ask of a model's family."""
    return {LAYER_DROPPING}


def check(model_or_config: Any, p: Params) -> None:
    """Refuse, naming family and method, a model whose family cannot take these cuts."""
    require_all(model_or_config, "depth", needs(p))


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
