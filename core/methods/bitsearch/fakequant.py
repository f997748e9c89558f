"""The weights a trial computes with: the quantization engine's own code, run per (module, choice).

The search must judge an allocation by what ``quantize`` will actually store, so the fake
quantizer follows the quantize stage's method and params:

- ``rtn`` — min/max grid (or the clipping search when ``clip_search``), fp16 scales, exactly
  :meth:`QuantLinear.from_linear`;
- ``gptq`` — :func:`gptq_weight` with each linear's Hessian taken from the calibration
  statistics (``XᵀX`` of the full-precision model; calibrate with ``collect_xtx: true``). The
  quantize stage runs GPTQ block by block on the outputs of already-quantized blocks, so its
  weights differ slightly from these; per-module results are what make trials cacheable.
- ``mrem``, ``e2e`` — their initialiser's (GPTQ or RTN): the scale learning that follows has no
  per-module equivalent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from pqflow.calibration import Calibration
from pqflow.methods.bitsearch.evaluator import QWeight, WeightFn, grid_weight, rtn_weight
from pqflow.methods.bitsearch.space import KEEP_BITS, Choice
from pqflow.quant.grid import mse_params


def rtn_clip_weight(name: str, w: torch.Tensor, choice: Choice, symmetric: bool) -> QWeight:
    """RTN with the per-group clipping search (``rtn`` with ``clip_search: true``)."""
    del name
    return grid_weight(w, choice, symmetric, mse_params)


def gptq_weight_fn(hessian: Callable[[str], torch.Tensor | None], params: Any) -> WeightFn:
    from pqflow.methods.quant.gptq import gptq_weight
    from pqflow.methods.quant.plan import LinearSpec

    def fn(name: str, w: torch.Tensor, choice: Choice, symmetric: bool) -> QWeight:
        if choice.bits == KEEP_BITS:
            return QWeight.kept(w)
        H = hessian(name)
        if H is None:
            raise ValueError(f"gptq fake-quantization needs XᵀX of {name}: calibrate with collect_xtx: true")
        spec = LinearSpec(choice.bits, choice.group_size, symmetric)
        codes, s, z = gptq_weight(w, H, spec, params.damp, params.block_size, params.act_order, params.clip_search)
        return QWeight.from_codes(codes, s, z, choice.group_size)

    return fn


def _rtn(params: Any, calib: Calibration | None) -> tuple[WeightFn, str]:
    del calib
    return (rtn_clip_weight, "rtn-clip") if getattr(params, "clip_search", False) else (rtn_weight, "rtn")


def _gptq(params: Any, calib: Calibration | None) -> tuple[WeightFn, str]:
    if calib is None or not calib.meta.get("xtx"):
        print("[pqflow] bit-search: calibration has no XᵀX (collect_xtx: false); trials use RTN instead of "
              "GPTQ", file=sys.stderr)
        return rtn_weight, "rtn"
    return gptq_weight_fn(calib.xtx, params), "gptq"


def _mrem(params: Any, calib: Calibration | None) -> tuple[WeightFn, str]:
    """MREM starts from its initialiser's codes; its scale learning has no per-module equivalent."""
    return _gptq(params.gptq, calib) if params.init == "gptq" else _rtn(None, calib)


def _e2e(params: Any, calib: Calibration | None) -> tuple[WeightFn, str]:
    """E2E keeps its initialiser's codes: trials use the initialiser's fake quantizer."""
    return FAKE_QUANT[params.init](getattr(params, params.init), calib)


# quantize method -> its per-module fake quantizer; one line per method that has one
FAKE_QUANT: dict[str, Callable[[Any, Calibration | None], tuple[WeightFn, str]]] = {
    "rtn": _rtn, "gptq": _gptq, "mrem": _mrem, "e2e": _e2e}


def weight_fn_for(method: str, params: Any, calib: Calibration | None) -> tuple[WeightFn, str]:
    """The fake quantizer matching the quantize stage's ``method`` (and a name for reports).
    Methods without a per-module equivalent fall back to round-to-nearest, said on stderr."""
    factory = FAKE_QUANT.get(method)
    if factory is None:
        print(f"[pqflow] bit-search: no per-module fake quantizer for '{method}'; trials use RTN", file=sys.stderr)
        return rtn_weight, "rtn"
    return factory(params, calib)
