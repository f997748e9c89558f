"""Prune methods: each module exposes ``Params``, ``plan(geometries, scores, target, params)``
returning a :class:`~pqflow.methods.prune.plan.PrunePlan`, ``needs(params)`` (the capabilities of
:mod:`pqflow.architectures` the params ask of a family: HEAD_PRUNING, CHANNEL_PRUNING,
LAYER_DROPPING) and ``check(model_or_config, params)``, which refuses a family that lacks one,
naming family and method. :mod:`.surgery` applies a plan and :mod:`.correction` (reformation,
mask tuning) corrects the kept weights."""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("prune", {
    "width": "pqflow.methods.prune.width",
    "depth": "pqflow.methods.prune.depth",
    "hybrid": "pqflow.methods.prune.hybrid",
})
