"""What to keep: the plan a prune method produces and the surgery applies.

Units of removal keep the result GQA-consistent and quantization-friendly: query heads go one per
KV group at a time (every group keeps the same number of query heads, which is what HF's
``repeat_kv`` needs), or whole GQA groups; MLP channels go in blocks of ``round_to``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from pqflow.architectures import LayerGeometry

HeadMode = Literal["query", "group", "none"]


@dataclass
class LayerKeep:
    heads: list[int]  # kept query heads (original indices, grouped by KV head)
    kv: list[int]  # kept KV heads
    channels: list[int]  # kept MLP channels

    def geometry(self, g: LayerGeometry) -> LayerGeometry:
        return replace(g, n_heads=len(self.heads), n_kv=len(self.kv), inter=len(self.channels))


@dataclass
class PrunePlan:
    drop: list[int] = field(default_factory=list)  # decoder layers removed
    keep: dict[int, LayerKeep] = field(default_factory=dict)  # width cuts of kept layers (absent: untouched)

    def kept_layers(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if i not in set(self.drop)]

    def removed_params(self, geos: list[LayerGeometry]) -> int:
        out = 0
        for i, g in enumerate(geos):
            if i in self.drop:
                out += g.params
            elif i in self.keep:
                out += g.params - self.keep[i].geometry(g).params
        return out

    def to_json(self, geos: list[LayerGeometry]) -> dict:
        layers = []
        for i, g in enumerate(geos):
            k = self.keep.get(i)
            kg = k.geometry(g) if k else g
            layers.append({
                "layer": i, "dropped": i in self.drop,
                "heads": 0 if i in self.drop else kg.n_heads, "kv_heads": 0 if i in self.drop else kg.n_kv,
                "channels": 0 if i in self.drop else kg.inter,
            })
        return {"drop": sorted(self.drop), "layers": layers}


def full_keep(g: LayerGeometry) -> LayerKeep:
    return LayerKeep(list(range(g.n_heads)), list(range(g.n_kv)), list(range(g.inter)))


@dataclass
class UnitQueue:
    """Removal units of one kind in one layer, cheapest-to-lose first."""

    layer: int
    kind: Literal["head", "channel"]
    scores: list[float]  # score of each successive unit
    members: list[list[int]]  # what each unit removes (query heads / KV groups / channels)
    cost: list[int]  # parameters each unit removes
    taken: int = 0

    def peek(self) -> tuple[float, int] | None:
        if self.taken >= len(self.scores):
            return None
        return self.scores[self.taken], self.cost[self.taken]


def channel_queue(layer: int, scores: torch.Tensor, g: LayerGeometry, round_to: int, min_keep: int) -> UnitQueue:
    order = torch.argsort(scores.double(), stable=True).tolist()
    keep_min = -(-max(min_keep, round_to) // round_to) * round_to
    blocks, start = [], 0
    if g.inter % round_to:
        # Trim the ragged remainder first so the kept count lands on a multiple of round_to.
        start = g.inter % round_to
        blocks.append(order[:start])
    while g.inter - (start + round_to) >= keep_min:
        blocks.append(order[start: start + round_to])
        start += round_to
    s = scores.double()
    return UnitQueue(layer, "channel", [float(s[b].sum()) for b in blocks], blocks,
                     [(3 if g.gated else 2) * g.hidden * len(b) for b in blocks])


def head_queue(layer: int, head: torch.Tensor | None, kv_group: torch.Tensor | None, g: LayerGeometry,
               mode: HeadMode) -> UnitQueue:
    if mode == "none":
        return UnitQueue(layer, "head", [], [], [])
    if mode == "group":
        assert kv_group is not None
        order = torch.argsort(kv_group.double(), stable=True).tolist()[: g.n_kv - 1]
        per = 2 * g.hidden * g.head_dim * (g.group + 1)
        return UnitQueue(layer, "head", [float(kv_group[k]) for k in order], [[k] for k in order],
                         [per] * len(order))
    assert head is not None
    # One query head per KV group per unit, each group losing its own weakest next.
    per_group = [sorted(g.head_of(k), key=lambda h: float(head[h])) for k in range(g.n_kv)]
    scores, members = [], []
    for r in range(g.group - 1):
        hs = [grp[r] for grp in per_group]
        members.append(hs)
        scores.append(float(sum(float(head[h]) for h in hs)))
    return UnitQueue(layer, "head", scores, members, [2 * g.hidden * g.head_dim * g.n_kv] * len(scores))


def apply_units(g: LayerGeometry, q_heads: UnitQueue, q_ch: UnitQueue, n_head_units: int, n_ch_units: int,
                mode: HeadMode) -> LayerKeep:
    keep = full_keep(g)
    gone_heads = {h for u in q_heads.members[:n_head_units] for h in u}
    if mode == "group":
        gone_kv = gone_heads  # members are KV groups
        keep.kv = [k for k in keep.kv if k not in gone_kv]
        keep.heads = [h for k in keep.kv for h in g.head_of(k)]
    else:
        keep.heads = [h for h in keep.heads if h not in gone_heads]
    gone_ch = {c for u in q_ch.members[:n_ch_units] for c in u}
    keep.channels = [c for c in keep.channels if c not in gone_ch]
    return keep
