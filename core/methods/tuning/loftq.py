"""LoftQ initialisation against our own quantizer (QPruner's adapter init).

peft's ``init_lora_weights="loftq"`` quantizes with bitsandbytes NF4 on a CUDA/XPU device only
(``peft.utils.loftq_utils.loftq_init`` hard-codes the compute device) and keeps a fake-quantized
float base. Here the same alternation runs on any device against pqflow's packed grid, and the
base ends up as a real :class:`~pqflow.quant.QuantLinear`:

    R_0 = W;  for t in 1..T:  Q_t = quant(R_{t-1});  L_t R_t = rank-r SVD of (W - deq(Q_t));
                              R_t = W - L_t R_t

so that ``deq(Q) + scaling * B A`` starts close to the float ``W`` (not to ``deq(Q)``, as a
zero-initialised adapter does).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from pqflow.calibration import decoder_linears
from pqflow.quant import QuantLinear
from pqflow.quant.model import set_module


@torch.no_grad()
def loftq_linear(linear: nn.Linear, r: int, scaling: float, bits: int, group_size: int | None,
                 symmetric: bool, iters: int) -> tuple[QuantLinear, torch.Tensor, torch.Tensor, float, float]:
    """(packed layer, lora_A ``[r, in]``, lora_B ``[out, r]``, relative error of plain RTN,
    relative error of quant + adapter)."""
    w = linear.weight.detach().float()
    tmp = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    tmp.bias = linear.bias
    res = w
    q = a = b = None
    rtn_err = 0.0
    norm = float(w.norm()) or 1.0
    for t in range(iters):
        tmp.weight = nn.Parameter(res, requires_grad=False)
        q = QuantLinear.from_linear(tmp, bits, group_size, symmetric)
        resid = w - q.dequantize(torch.float32)
        if t == 0:
            rtn_err = float(resid.norm()) / norm
        u, s, vh = torch.linalg.svd(resid, full_matrices=False)
        root = s[:r].sqrt()
        # scaling * B @ A must equal the rank-r residual, whatever lora_alpha / r is.
        b = u[:, :r] * root / scaling**0.5
        a = root[:, None] * vh[:r] / scaling**0.5
        res = w - scaling * (b @ a)
    assert q is not None and a is not None and b is not None
    err = float((w - q.dequantize(torch.float32) - scaling * (b @ a)).norm()) / norm
    return q, a.contiguous(), b.contiguous(), rtn_err, err


def loftq_quantize(model: nn.Module, targets: list[str], r: int, scaling: float, bits: int,
                   group_size: int | None, symmetric: bool, iters: int
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Swap every decoder ``nn.Linear`` for a packed ``QuantLinear``: LoftQ for the LoRA targets
    (full module names), round-to-nearest for the rest. Returns the adapter initialisation per
    module and the mean relative weight errors."""
    linears = decoder_linears(model)
    if not linears:
        raise ValueError("LoftQ needs a float model (nn.Linear decoder layers); the input is already quantized")
    init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = set(targets)
    rtn_errs, errs = [], []
    for name, lin in tqdm(linears.items(), desc="loftq", file=sys.stderr, mininterval=5):
        if name in wanted:
            q, a, b, e0, e1 = loftq_linear(lin, r, scaling, bits, group_size, symmetric, iters)
            init[name] = (a, b)
            rtn_errs.append(e0)
            errs.append(e1)
        else:
            q = QuantLinear.from_linear(lin, bits, group_size, symmetric)
        set_module(model, name, q.to(lin.weight.device))
    stats = {"loftq_rtn_rel_err": sum(rtn_errs) / max(1, len(rtn_errs)),
             "loftq_rel_err": sum(errs) / max(1, len(errs)), "loftq_modules": len(init)}
    return init, stats
