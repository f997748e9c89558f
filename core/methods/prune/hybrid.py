"""Hybrid pruning (COMP): remove the least important layers first, then neurons in the rest.

``layer_share`` of the parameter budget goes to whole layers (by layer scores), the remainder to
width cuts of the surviving layers (by default MLP neurons only, as COMP does, ranked globally).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pqflow.architectures import LAYER_DROPPING, LayerGeometry
from pqflow.methods.importance.common import Scores
from pqflow.methods.prune import width
from pqflow.methods.prune.common import require_all
from pqflow.methods.prune.depth import choose_layers
from pqflow.methods.prune.plan import HeadMode, PrunePlan


class Params(width.Params):
    layer_share: float = Field(0.5, ge=0, le=1, description="fraction of the budget removed as whole layers")
    head_mode: HeadMode = Field("none", description="COMP prunes neurons of the dense layers only")


def needs(p: Params) -> set[str]:
    """The adapter capabilities these parameters ask of a model's family: layer dropping for the
    layer share, and what the width share cuts (the rest of the budget, whatever ``layer_share``)."""
    return ({LAYER_DROPPING} if p.layer_share > 0 else set()) | width.needs(p)


def check(model_or_config: Any, p: Params) -> None:
    """Refuse, naming family and method, a model whose family cannot take these cuts."""
    require_all(model_or_config, "hybrid", needs(p))


def plan(geos: list[LayerGeometry], scores: Scores, target: int, p: Params) -> PrunePlan:
    drop = choose_layers(geos, scores, int(target * p.layer_share), p)
    left = target - sum(geos[i].params for i in drop)
    kept = [i for i in range(len(geos)) if i not in drop]
    # Width-prune the survivors as a model of their own, then map back to original indices.
    sub_scores = Scores(
        scores.method, scores.layer[kept],
        [scores.head[i] for i in kept] if scores.head is not None else None,
        [scores.kv_group[i] for i in kept] if scores.kv_group is not None else None,
        [scores.channel[i] for i in kept] if scores.channel is not None else None,
    )
    sub_p = p.model_copy(update={
        "protect_first": max(0, p.protect_first - sum(1 for i in drop if i < p.protect_first)),
        "protect_last": max(0, p.protect_last - sum(1 for i in drop if i >= len(geos) - p.protect_last)),
    })
    out = PrunePlan(drop=drop)
    if left > 0 and (p.channels or p.head_mode != "none"):  # both off: whole layers only
        sub = width.plan([geos[i] for i in kept], sub_scores, left, sub_p)
        out.keep = {kept[j]: k for j, k in sub.keep.items()}
    return out
