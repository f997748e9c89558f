"""``hf-dense``: dequantized fp16/bf16 safetensors in the standard transformers layout.

Loads with a plain ``AutoModelForCausalLM.from_pretrained`` (no pqflow, no quantization package)
and in any engine that reads Hugging Face folders. Pruned models with the same width in every
layer get the shrunk sizes in ``config.json``; uneven widths have no place in a standard config:
they fail with the first layer that differs, or are zero-padded to the widest (``uneven: pad``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqflow.export import ExportOptions
from pqflow.export.dense import densify, load_for_export, standard_config
from pqflow.models import DTYPES, cast_float

DESCRIPTION = "dequantized fp16/bf16 safetensors in the standard transformers layout"
ENGINES = ("transformers", "vllm")


def export(src: Path, out: Path, options: ExportOptions) -> dict[str, Any]:
    loaded, padded = load_for_export(src, "hf-dense", options)
    model = densify(loaded.model)
    standard_config(model, "hf-dense")
    cast_float(model, DTYPES[options.dtype])
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"dtype": options.dtype, "params": params, **({"padded": padded} if padded else {})}
