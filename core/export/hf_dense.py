"""``hf-dense``: dequantized fp16/bf16 safetensors in the standard transformers layout.

Loads with a plain ``AutoModelForCausalLM.from_pretrained`` (no pqflow, no quantization package)
and in any engine that reads Hugging Face folders. Pruned models with the same width in every
layer get the shrunk sizes in ``config.json``; uneven widths have no place in a standard config
and fail with the first layer that differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqflow.export import ExportOptions
from pqflow.export.dense import check_uniform_shapes, densify, standard_config
from pqflow.models import DTYPES, cast_float, load_model_artifact

DESCRIPTION = "dequantized fp16/bf16 safetensors in the standard transformers layout"
ENGINES = ("transformers", "vllm")


def export(src: Path, out: Path, options: ExportOptions) -> dict[str, Any]:
    check_uniform_shapes(src, "hf-dense")
    loaded = load_model_artifact(src)
    model = densify(loaded.model)
    standard_config(model, "hf-dense")
    cast_float(model, DTYPES[options.dtype])
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"dtype": options.dtype, "params": params}
