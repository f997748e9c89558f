"""Refuse a model config before anything is built from it.

``config.json`` decides how much memory constructing a model takes; a hostile or broken one
(``hidden_size: 1000000``) would make ``from_config`` allocate terabytes before any weight is read.
:func:`check_config` estimates the parameter count from the config alone and refuses, naming the
fields, when a dimension is not a sane positive integer, when the model would not fit in the
memory available, or when the weight files on disk are far too small to hold it.
"""

from __future__ import annotations

from typing import Any

import psutil
import torch

from pqflow.errors import SourceError

MAX_DIM = 2**20  # widths, heads, layers
MAX_VOCAB = 2**24  # vocabulary and positions
# pqflow stores at least 2 bits per weight (4 params/byte); 8 leaves a 2x margin for the estimate.
PARAMS_PER_BYTE = 8

_DIMS = {
    "vocab_size": MAX_VOCAB, "hidden_size": MAX_DIM, "intermediate_size": MAX_DIM,
    "num_hidden_layers": MAX_DIM, "num_attention_heads": MAX_DIM, "num_key_value_heads": MAX_DIM,
    "head_dim": MAX_DIM, "max_position_embeddings": MAX_VOCAB,
    # MoE: experts per block and each expert's width (the MLP parameters live there)
    "num_experts": MAX_DIM, "moe_intermediate_size": MAX_DIM,
}
_ZERO_MEANS_NONE = {"num_experts", "moe_intermediate_size"}  # a dense model may say 0 experts


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _text_config(config: Any) -> Any:
    # Multimodal configs nest the language model's dimensions.
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def valid_dim(name: str, value: Any, limit: int = MAX_DIM, where: str = "config.json") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise SourceError(f"{where}: {name}={value!r} is not a positive integer <= {limit}")
    return value


def config_dims(config: Any) -> dict[str, int]:
    """The size-defining fields present in ``config`` (missing ones are left out), validated."""
    cfg = _text_config(config)
    return {k: valid_dim(k, v, lim) for k, lim in _DIMS.items()
            if (v := _get(cfg, k)) is not None and not (k in _ZERO_MEANS_NONE and v == 0)}


def _layer_shapes(config: Any, dims: dict[str, int]) -> list[tuple[int, int, int]] | None:
    from pqflow.formats.pruned import SHAPES_KEY  # pruned models' per-layer shapes

    shapes = _get(config, SHAPES_KEY)
    if not isinstance(shapes, list) or len(shapes) != dims.get("num_hidden_layers"):
        return None
    if not all(isinstance(s, list) and len(s) == 3 for s in shapes):
        raise SourceError(f"config.json: {SHAPES_KEY} must list [n_heads, n_kv_heads, intermediate] per layer")
    return [tuple(valid_dim(SHAPES_KEY, v, MAX_DIM) for v in s) for s in shapes]


def estimate_params(dims: dict[str, int], tied: bool = True,
                    shapes: list[tuple[int, int, int]] | None = None) -> int:
    """A lower bound on a decoder's parameter count: embeddings, attention projections and a
    two-matrix MLP per layer (gated MLPs have three); norms and biases are left out. An MoE config
    (``num_experts`` and ``moe_intermediate_size``) counts its experts' MLPs instead, and a pruned
    MoE layer's listed width is per expert."""
    h = dims.get("hidden_size", 0)
    heads = dims.get("num_attention_heads", 1)
    hd = dims.get("head_dim", h // heads)
    kv = dims.get("num_key_value_heads", heads)
    experts = dims.get("num_experts", 0) if "moe_intermediate_size" in dims else 0
    inter = dims.get("moe_intermediate_size", 0) if experts else dims.get("intermediate_size", 0)
    layers = shapes or [(heads, kv, inter)] * dims.get("num_hidden_layers", 0)
    per_layer = sum(2 * h * hd * (nh + nkv) + 2 * h * w * max(1, experts) for nh, nkv, w in layers)
    return dims.get("vocab_size", 0) * h * (1 if tied else 2) + per_layer


def check_config(config: Any, *, where: str, dtype: torch.dtype, weight_bytes: int | None = None,
                 listed_params: int = 0) -> int:
    """Refuse ``config`` (a transformers config or its dict) before a model is built from it.

    ``dtype``: what the model is constructed in; ``weight_bytes``: the bytes of its weight files
    when they are on disk; ``listed_params``: the weights a format lists outside config.json
    (quantized modules), which must fit as well. Returns the estimated parameter count."""
    dims = config_dims(config)
    tied = bool(_get(_text_config(config), "tie_word_embeddings"))
    # from_config builds the full-size model; a pruned one is stored with its per-layer shapes.
    built = max(estimate_params(dims, tied), listed_params)
    stored = max(estimate_params(dims, tied, _layer_shapes(config, dims)), listed_params)
    fields = ", ".join(f"{k}={v}" for k, v in dims.items())
    need, avail = built * dtype.itemsize, psutil.virtual_memory().available
    if need > avail:
        raise SourceError(f"{where}: config.json describes ~{built / 1e9:.3g} B parameters ({fields}): "
                          f"{need / 2**30:.3g} GiB in {str(dtype).removeprefix('torch.')}, more than the "
                          f"{avail / 2**30:.3g} GiB of memory available")
    if weight_bytes is not None and stored > PARAMS_PER_BYTE * weight_bytes:
        raise SourceError(f"{where}: config.json describes ~{stored / 1e6:.3g} M parameters ({fields}) but the "
                          f"weight files hold only {weight_bytes} bytes: the config does not match the weights")
    return built
