"""Quantization methods. Each module exposes ``Params`` and

    quantize(model, windows, plan, params) -> model

where ``windows`` are calibration token windows (``[n, seqlen]``, or ``None``) and ``plan`` maps
every decoder linear to quantize to its :class:`~pqflow.methods.quant.plan.LinearSpec`."""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("quantize", {
    "rtn": "pqflow.methods.quant.rtn",
    "gptq": "pqflow.methods.quant.gptq",
    "mrem": "pqflow.methods.quant.mrem",
    "e2e": "pqflow.methods.quant.e2e",
    "bnb-nf4": "pqflow.methods.quant.bnb_nf4",
    "bnb-int8": "pqflow.methods.quant.bnb_int8",
})
