"""Prune methods: each module exposes ``Params`` and ``plan(geometries, scores, target, params)``
returning a :class:`~pqflow.methods.prune.plan.PrunePlan`; :mod:`.surgery` applies it and
:mod:`.correction` (reformation, mask tuning) corrects the kept weights."""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("prune", {
    "width": "pqflow.methods.prune.width",
    "depth": "pqflow.methods.prune.depth",
    "hybrid": "pqflow.methods.prune.hybrid",
})
