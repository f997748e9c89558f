"""Bit-search methods: per-layer / per-linear precision under a byte budget.

Each method module exposes ``Params`` and ``search(ctx, params) -> Trial`` (the chosen
allocation, already evaluated); every evaluation lands in ``ctx.trials``.
"""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("bit-search", {
    "importance-prior": "pqflow.methods.bitsearch.importance_prior",
    "nevergrad": "pqflow.methods.bitsearch.nevergrad_search",
    "nevergrad-prior": "pqflow.methods.bitsearch.nevergrad_prior",
    "uniform": "pqflow.methods.bitsearch.uniform",
})
