"""``hf-dense``: dequantized fp16/bf16 safetensors in the standard transformers layout.

Loads with a plain ``AutoModelForCausalLM.from_pretrained`` (no pqflow, no quantization package)
and in any engine that reads Hugging Face folders. Pruned models with the same width in every
layer get the shrunk sizes in ``config.json``; uneven widths have no place in a standard config
and fail with the first layer that differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqflow.export import ExportError, ExportOptions
from pqflow.export.dense import densify, uniform_widths
from pqflow.methods.importance.common import decoder_layers
from pqflow.methods.prune.surgery import SHAPES_KEY
from pqflow.models import DTYPES, cast_float, load_model_artifact

DESCRIPTION = "dequantized fp16/bf16 safetensors in the standard transformers layout"
ENGINES = ("transformers", "vllm")


def _uneven(first: int) -> ExportError:
    return ExportError(
        f"model.layers.{first} has another width than model.layers.0 (pruned unevenly); a standard "
        "transformers config holds one width for every layer: prune with allocation 'uniform' for hf-dense")


def export(src: Path, out: Path, options: ExportOptions) -> dict[str, Any]:
    cfg_path = src / "config.json"
    shapes = (json.loads(cfg_path.read_text()).get(SHAPES_KEY) if cfg_path.is_file() else None) or []
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise _uneven(i)  # before the model is loaded
    loaded = load_model_artifact(src)
    model = densify(loaded.model)
    width, first_uneven = uniform_widths(model)
    if first_uneven is not None:
        raise _uneven(first_uneven)
    cfg = model.config
    if width is not None:
        cfg.head_dim = decoder_layers(model)[0].self_attn.head_dim  # not hidden / heads once heads are pruned
        cfg.num_attention_heads, cfg.num_key_value_heads = width.n_heads, width.n_kv_heads
        cfg.intermediate_size = width.intermediate
    for key in (SHAPES_KEY, "quantization_config"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    cast_float(model, DTYPES[options.dtype])
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"dtype": options.dtype, "params": params}
