"""``pqflow-bnb``: transformers' own bitsandbytes checkpoint (NF4 or LLM.int8 linears, other
tensors in fp16) plus the compute dtype the model was quantized with.

bitsandbytes 0.50 runs both kinds on the CPU. The conversion itself is a quantize method
(:mod:`pqflow.methods.quant.bnb`); this module only writes and reads the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqflow.errors import SourceError
from pqflow.formats import from_pretrained
from pqflow.model_limits import check_config
from pqflow.models import DTYPES, LoadedModel, load_config, load_tokenizer, weight_bytes

NAME = "pqflow-bnb"


def require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"bitsandbytes is not importable ({e}); install pqflow[quantize]") from None


def is_bnb_param(p: torch.Tensor) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """transformers' bnb checkpoint, float tensors in fp16 (their values are fp16-exact, so the
    fp32 copy re-loaded from it is identical)."""
    floats = [p for p in model.parameters() if p.is_floating_point() and not is_bnb_param(p)]
    orig = [p.data for p in floats]
    try:
        for p in floats:
            p.data = p.data.to(torch.float16)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        for p, d in zip(floats, orig, strict=True):
            p.data = d
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"compute_dtype": str(orig[0].dtype).removeprefix("torch.") if orig else "float32"}


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    require_bnb()
    folder = Path(folder)
    name = meta.get("compute_dtype", "float32")
    if name not in DTYPES:
        raise SourceError(f"{folder}: unsupported compute_dtype {name!r} (known: {', '.join(DTYPES)})")
    dtype = DTYPES[name]
    # Sized here, before from_pretrained builds the model.
    config = load_config(folder)
    check_config(config, where=str(folder), dtype=dtype, weight_bytes=weight_bytes(folder))
    model = from_pretrained(folder, config, dtype=dtype, device_map="cpu")
    restore_dtypes(model, dtype)
    return LoadedModel(model.eval(), load_tokenizer(folder), str(folder))


@torch.no_grad()
def restore_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """A bnb checkpoint re-loads with its float tensors in their stored fp16 and the 4-bit
    dequantization dtype as bf16 whatever ``dtype`` says; put both back to the compute dtype
    the model was quantized with, so re-loaded logits equal the original's."""
    for p in model.parameters():
        if p.is_floating_point() and not is_bnb_param(p):
            p.data = p.data.to(dtype)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype
