"""Width pruning: remove attention heads (GQA-consistent) and MLP channels inside decoder layers.

``allocation`` decides how many units each layer loses:
- ``uniform``: the same fraction of every prunable layer (LLM-Pruner's setting with
  ``protect_first``/``protect_last``), heads and channels at that same fraction, MLP rounding spread
  over layers so the total meets the target;
- ``global``: one ranking of all units of all prunable layers by score per removed parameter, so
  layers lose what they can spare (non-uniform ratios);
- ``layer-score``: per-layer fractions from the layer scores (less important layers lose more),
  uniform inside each layer.

``channels: false`` leaves the MLPs alone (heads only: the one width cut an MoE block takes);
``head_mode: none`` leaves the attention alone (MLP channels only: Phi-3, OLMo 2). :func:`needs`
names the adapter capabilities the parameters ask of a family.
"""

from __future__ import annotations

import heapq
from typing import Any, Literal

from pydantic import Field

from pqflow.architectures import CHANNEL_PRUNING, HEAD_PRUNING, LayerGeometry
from pqflow.errors import PqflowError
from pqflow.methods.importance.common import Scores
from pqflow.methods.prune.common import CommonParams, prunable_layers, require_all
from pqflow.methods.prune.plan import HeadMode, PrunePlan, UnitQueue, apply_units, channel_queue, head_queue
from pqflow.recipe import MAX_GROUP


class Params(CommonParams):
    allocation: Literal["uniform", "global", "layer-score"] = Field("global", description="how the budget spreads over layers")
    head_mode: HeadMode = Field("query", description="query: query heads, equal count per KV group; group: whole GQA groups; none: MLP only")
    round_to: int = Field(64, ge=1, le=MAX_GROUP, description="kept MLP channels are a multiple of this (64-wide quantization groups)")
    min_channels: int = Field(64, ge=1, le=1 << 20, description="fewest MLP channels a layer keeps")
    channels: bool = Field(True, description="prune MLP channels (false: heads only, e.g. MoE blocks)")
    per_param: bool = Field(True, description="global: rank units by score per removed parameter")
    normalize: Literal["none", "layer-mean"] = Field("none", description="global: divide scores by their layer's mean first")
    spread: float = Field(1.0, ge=0, le=100, description="layer-score: 0 = uniform, 1 = fractions proportional to 1/score")


def needs(p: Params) -> set[str]:
    """The adapter capabilities these parameters ask of a model's family."""
    return ({HEAD_PRUNING} if p.head_mode != "none" else set()) | ({CHANNEL_PRUNING} if p.channels else set())


def check(model_or_config: Any, p: Params) -> None:
    """Refuse, naming family and method, a model whose family cannot take these cuts."""
    require_all(model_or_config, "width", needs(p))


def _queues(geos: list[LayerGeometry], scores: Scores, layers: list[int], p: Params) -> dict[int, tuple[UnitQueue, UnitQueue]]:
    if not p.channels and p.head_mode == "none":
        raise PqflowError("width pruning with head_mode 'none' and channels false has nothing to remove")
    if p.channels and scores.channel is None:
        raise PqflowError(f"width pruning needs channel scores; importance '{scores.method}' gives only "
                          f"{', '.join(scores.granularities())} (use taylor, condition, wanda-sp or magnitude, "
                          f"or set channels: false for heads only)")
    need = {"query": "head", "group": "kv_group"}.get(p.head_mode)
    if need and getattr(scores, need) is None:
        raise PqflowError(f"head_mode '{p.head_mode}' needs {need} scores, which '{scores.method}' does not give")
    out = {}
    for i in layers:
        g = geos[i]
        head = scores.head[i] if scores.head is not None else None
        kv = scores.kv_group[i] if scores.kv_group is not None else None
        ch = scores.channel[i] if p.channels else None
        if p.normalize == "layer-mean":
            ch = ch / ch.double().mean().clamp_min(1e-30) if ch is not None else None
            head = head / head.double().mean().clamp_min(1e-30) if head is not None else None
            kv = kv / kv.double().mean().clamp_min(1e-30) if kv is not None else None
        cq = channel_queue(i, ch, g, p.round_to, p.min_channels) if ch is not None else UnitQueue(i, "channel", [], [], [])
        out[i] = (head_queue(i, head, kv, g, p.head_mode), cq)
    return out


def _global(queues: dict[int, tuple[UnitQueue, UnitQueue]], target: int, p: Params) -> dict[int, list[int]]:
    taken = {i: [0, 0] for i in queues}
    heap: list[tuple[float, int, int]] = []

    def push(i: int, kind: int) -> None:
        nxt = queues[i][kind].peek()
        if nxt is not None:
            s, cost = nxt
            heapq.heappush(heap, (s / cost if p.per_param else s, i, kind))

    for i in queues:
        push(i, 0)
        push(i, 1)
    removed = 0
    while heap:
        _, i, kind = heapq.heappop(heap)
        q = queues[i][kind]
        cost = q.cost[q.taken]
        if removed + cost / 2 > target:
            continue  # this unit would overshoot more than it helps; a smaller one may still fit
        q.taken += 1
        taken[i][kind] += 1
        removed += cost
        push(i, kind)
    return taken


def _fractional(queues: dict[int, tuple[UnitQueue, UnitQueue]], geos: list[LayerGeometry],
                ratios: dict[int, float], target: int) -> dict[int, list[int]]:
    """Each layer loses ``ratios[i]`` of its parameters: heads at that fraction first, then MLP
    blocks; MLP rounding is settled across layers (largest remainder) to meet ``target``."""
    taken, frac, removed = {}, {}, 0
    for i, (hq, cq) in queues.items():
        g = geos[i]
        r = ratios[i]
        per_unit_frac = (hq.cost[0] / g.attn_params) if hq.cost else 0.0
        n_h = min(len(hq.scores), round(r / per_unit_frac)) if per_unit_frac else 0
        head_removed = sum(hq.cost[:n_h])
        want = max(0.0, r * g.params - head_removed)
        exact = min(float(len(cq.scores)), want / cq.cost[-1]) if cq.cost else 0.0
        taken[i] = [n_h, int(exact)]
        frac[i] = exact - int(exact)
        removed += head_removed + sum(cq.cost[: int(exact)])
    for i in sorted(frac, key=lambda k: -frac[k]):
        cq = queues[i][1]
        if taken[i][1] < len(cq.scores) and removed + cq.cost[taken[i][1]] / 2 <= target:
            removed += cq.cost[taken[i][1]]
            taken[i][1] += 1
    return taken


def plan(geos: list[LayerGeometry], scores: Scores, target: int, p: Params) -> PrunePlan:
    """Remove about ``target`` parameters by width cuts."""
    layers = prunable_layers(len(geos), p)
    if not layers:
        raise PqflowError("width pruning: protect_first + protect_last leave no layer to prune")
    queues = _queues(geos, scores, layers, p)
    if p.allocation == "global":
        taken = _global(queues, target, p)
    else:
        base = sum(geos[i].params for i in layers)
        r = target / base
        if p.allocation == "uniform":
            ratios = dict.fromkeys(layers, r)
        else:
            s = scores.layer.double()[layers].clamp_min(1e-12)
            w = (1 / s) / (1 / s).mean()
            raw = r * (1 - p.spread + p.spread * w)
            ratios = {i: float(x) for i, x in zip(layers, raw.clamp(0, 0.9), strict=True)}
        taken = _fractional(queues, geos, ratios, target)
    out = PrunePlan()
    for i in layers:
        hq, cq = queues[i]
        if taken[i][0] or taken[i][1]:
            out.keep[i] = apply_units(geos[i], hq, cq, taken[i][0], taken[i][1], p.head_mode)
    return out
