"""bitsandbytes formats through transformers: QLoRA's NF4 (blocks of 64, optional double
quantization of the absmax constants) and LLM.int8 (row-wise int8, outlier columns in fp16).

The model is written as an fp16 checkpoint and re-loaded by ``from_pretrained`` with a
``BitsAndBytesConfig``, so the layers are exactly what bitsandbytes users serve. bitsandbytes
0.50 runs both formats on the CPU (its native CPU backend); the saved artifact is transformers'
own ``save_pretrained`` output, format ``pqflow-bnb`` (:mod:`pqflow.formats.bitsandbytes`). Only
the decoder linears in the plan are converted; bits in the plan are ignored (the format decides).
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

from pqflow.calibration import decoder_linears
from pqflow.formats import bitsandbytes as bnb_format
from pqflow.formats import from_pretrained
from pqflow.formats.bitsandbytes import require_bnb
from pqflow.methods.quant.plan import Plan
from pqflow.models import cast_float, load_config

NEEDS_CALIBRATION = False
FORMAT = bnb_format.NAME  # the model format these methods write


QUANTIZES_EMBEDDINGS = False  # transformers' bitsandbytes layers: the decoder linears only


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
    require_bnb()
    want = 4 if kind == "nf4" else 8
    odd = sorted({s.bits for s in plan.values()} - {want})
    if odd:
        print(f"[pqflow] bnb-{kind}: plan asks for {odd} bits; bitsandbytes {kind} stores {want}-bit",
              file=sys.stderr)
    # Linears outside the plan keep full precision, and so does the output head: the skip list
    # names them (MoE routers are no linears bitsandbytes would take).
    head = model.get_output_embeddings()
    skip = [n for n, m in model.named_modules() if m is head] + [n for n in decoder_linears(model) if n not in plan]
    compute = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="pqflow-bnb-") as tmp:
        cast_float(model, torch.float16).save_pretrained(tmp, safe_serialization=True)
        # The prepared class: the checkpoint names MoE experts as linears, which bitsandbytes
        # then quantizes like every other linear.
        qmodel = from_pretrained(tmp, load_config(tmp),
                                 quantization_config=bnb_config(kind, double_quant, threshold, skip, compute),
                                 dtype=compute, device_map="cpu")
    return qmodel.eval()
