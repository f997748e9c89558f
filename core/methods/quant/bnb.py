"""bitsandbytes formats through transformers: QLoRA's NF4 (blocks of 64, optional double
quantization of the absmax constants) and LLM.int8 (row-wise int8, outlier columns in fp16).

The model is written as an fp16 checkpoint and re-loaded by ``from_pretrained`` with a
``BitsAndBytesConfig``, so the layers are exactly what bitsandbytes users serve. bitsandbytes
0.50 runs both formats on the CPU (its native CPU backend); the saved artifact is transformers'
own ``save_pretrained`` output plus ``pqflow_model.json`` (backend ``bitsandbytes``). Only the
decoder linears in the plan are converted; bits in the plan are ignored (the format decides).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqflow.calibration import decoder_linears
from pqflow.methods.quant.plan import Plan
from pqflow.models import LoadedModel, cast_float

NEEDS_CALIBRATION = False


def _require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"bitsandbytes is not importable ({e}); install pqflow[quantize]") from None


def bnb_config(kind: str, double_quant: bool = True, threshold: float = 6.0,
               skip: list[str] | None = None, compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip)


def convert(model: nn.Module, plan: Plan, kind: str, double_quant: bool = True, threshold: float = 6.0) -> nn.Module:
    """The model re-loaded with the plan's decoder linears in bitsandbytes format ``kind``."""
    _require_bnb()
    from transformers import AutoModelForCausalLM

    want = 4 if kind == "nf4" else 8
    odd = sorted({s.bits for s in plan.values()} - {want})
    if odd:
        print(f"[pqflow] bnb-{kind}: plan asks for {odd} bits; bitsandbytes {kind} stores {want}-bit",
              file=sys.stderr)
    # Linears outside the plan keep full precision: name their leaf names for the skip list.
    skip = ["lm_head"] + [n for n in decoder_linears(model) if n not in plan]
    compute = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="pqflow-bnb-") as tmp:
        cast_float(model, torch.float16).save_pretrained(tmp, safe_serialization=True)
        qmodel = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config(kind, double_quant, threshold, skip, compute),
            dtype=compute, device_map="cpu", use_safetensors=True, trust_remote_code=False)
    return qmodel.eval()


def _is_bnb_param(p: torch.Tensor) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Saver: transformers' bnb checkpoint, float tensors in fp16 (their values are fp16-exact,
    so the fp32 copy re-loaded from it is identical)."""
    floats = [p for p in model.parameters() if p.is_floating_point() and not _is_bnb_param(p)]
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
    return {"backend": "bitsandbytes", "compute_dtype": str(orig[0].dtype).removeprefix("torch.") if orig else "float32"}


def load_bnb(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    _require_bnb()
    from transformers import AutoModelForCausalLM

    from pqflow.models import load_tokenizer

    dtype = getattr(torch, meta.get("compute_dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu", use_safetensors=True,
                                                 trust_remote_code=False)
    restore_dtypes(model, dtype)
    return LoadedModel(model.eval(), load_tokenizer(folder), str(folder))


@torch.no_grad()
def restore_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """A bnb checkpoint re-loads with its float tensors in their stored fp16 and the 4-bit
    dequantization dtype as bf16 whatever ``dtype`` says; put both back to the compute dtype
    the model was quantized with, so re-loaded logits equal the original's."""
    for p in model.parameters():
        if p.is_floating_point() and not _is_bnb_param(p):
            p.data = p.data.to(dtype)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype
