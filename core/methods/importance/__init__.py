"""Importance methods: score decoder layers, attention heads (GQA groups) and MLP channels.

Each method module exposes ``Params`` and ``score(model, calib, params, progress) -> Scores``.
"""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("importance", {
    "taylor": "pqflow.methods.importance.taylor",
    "cosine-layer": "pqflow.methods.importance.cosine_layer",
    "condition": "pqflow.methods.importance.condition",
    "wanda-sp": "pqflow.methods.importance.wanda_sp",
    "magnitude": "pqflow.methods.importance.magnitude",
})
