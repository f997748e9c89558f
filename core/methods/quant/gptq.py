"""GPTQ: quantize a linear's columns one at a time and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian ``H = XᵀX`` of the layer's inputs
(Frantar et al., 2022). Blocks are processed in order: block ``i`` is calibrated on the outputs
of the already-quantized blocks ``< i``, from the calibration windows, not from fp statistics.
"""

from __future__ import annotations

import sys
import time

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from pqflow.methods.quant.blocks import BlockInputs, block_linears, capture_inputs, decoder_layers, run_block
from pqflow.methods.quant.plan import LinearSpec, Plan
from pqflow.quant.grid import minmax_params, mse_params, n_groups
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import set_module
from pqflow.recipe import MAX_BATCH, MAX_GROUP, MAX_WINDOWS

NEEDS_CALIBRATION = True


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    damp: float = Field(0.01, gt=0, le=1e6, description="damping added to H's diagonal, fraction of its mean")
    block_size: int = Field(128, ge=1, le=MAX_GROUP, description="columns updated lazily together (rounded up to a multiple of the group size)")
    act_order: bool = Field(False, description="quantize columns by decreasing H diagonal (group params then come from the original weights)")
    clip_search: bool = Field(True, description="per-group range shrink search weighted by H's diagonal")
    n_windows: int | None = Field(128, ge=1, le=MAX_WINDOWS, description="calibration windows used (null = all)")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="windows per block forward")


def _quant_col(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return q, (q - z) * s


def _group_params(w: torch.Tensor, spec: LinearSpec, diag: torch.Tensor | None, clip: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if clip:
        return mse_params(w, spec.bits, None, spec.symmetric, weight=diag)
    s, z = minmax_params(w, spec.bits, None, spec.symmetric)
    return s.to(torch.float16).float(), z


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: LinearSpec, damp: float = 0.01,
                block_size: int = 128, act_order: bool = False, clip_search: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one weight ``[out, in]`` with Hessian ``[in, in]``.

    Returns ``(codes [out, in] int64, scales [out, G], zeros [out, G])`` (scales fp16-exact).
    Without ``act_order`` each group's scale/zero is chosen when its first column is reached,
    from the error-updated weights (the usual GPTQ); with it, groups are fixed up front from the
    original weights, so that groups stay contiguous in storage whatever the column order.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    g = spec.group_size
    maxq = 2**spec.bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.diag(H).clone()
    G = n_groups(cols, g)
    gsz = cols if g is None else g
    static = act_order or g is None
    if static:
        if g is None:
            scales, zeros = _group_params(W, spec, diag, clip_search)
        else:
            scales = torch.empty(rows, G)
            zeros = torch.empty(rows, G)
            for j in range(G):
                sl = slice(j * g, min((j + 1) * g, cols))
                scales[:, j : j + 1], zeros[:, j : j + 1] = _group_params(W[:, sl], spec, diag[sl], clip_search)
    else:
        scales = torch.empty(rows, G)
        zeros = torch.empty(rows, G)
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = _inverse_cholesky(H)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    # Blocks aligned on group boundaries, so a group's columns lie inside one block.
    bs = block_size if static else -(-max(block_size, gsz) // gsz) * gsz
    gidx_perm = (perm // gsz) if g is not None else torch.zeros(cols, dtype=torch.long)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            gi = int(gidx_perm[c])
            if not static and c % gsz == 0:
                sl = slice(i, min(i + gsz, i2 - i1))
                s, z = _group_params(W1[:, sl], spec, diag[c : c + (sl.stop - sl.start)], clip_search)
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q, deq = _quant_col(w, scales[:, gi], zeros[:, gi], maxq)
            codes[:, c] = q.to(torch.int64)
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv], scales, zeros


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹; more damping when H is numerically not positive definite."""
    extra = 0.0
    for _ in range(6):
        try:
            Hd = H if extra == 0 else H + extra * torch.eye(len(H)) * torch.mean(torch.diag(H))
            L = torch.linalg.cholesky(Hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            extra = 0.01 if extra == 0 else extra * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 10x damping")


class HessianHooks:
    """Accumulates ``XᵀX`` of the inputs of the given linears during block forwards; linears
    reading the same tensor (q/k/v, gate/up) share one accumulation."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        # Inputs seen in the current batch, held so that their addresses cannot be reused by a
        # later tensor of the same shape (which would alias unrelated linears, e.g. gate/up to q).
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            seen = self._seen.get(key)
            if seen is not None and seen[0] != name:
                self.alias[name] = seen[0]
                return
            self._seen[key] = (name, x)
            x = x.reshape(-1, x.shape[-1]).float()
            if name in self.sums:
                self.sums[name].addmm_(x.T, x)
            else:
                self.sums[name] = x.T @ x
            self.count[name] = self.count.get(name, 0) + x.shape[0]

        return fn

    def new_batch(self) -> None:
        self._seen.clear()

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.alias.get(name, name)
        return self.sums[owner] * (2.0 / self.count[owner])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def collect_hessians(block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs) -> HessianHooks:
    hooks = HessianHooks(linears)
    try:
        for _, x in inputs.batches():
            hooks.new_batch()
            block(x, **inputs.kwargs)
    finally:
        hooks.remove()
    return hooks


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, plan: Plan, inputs: BlockInputs, params: Params) -> dict[str, float]:
    """GPTQ every planned linear of one block in place (swapped for ``QuantLinear``); returns
    each linear's relative output error proxy ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``."""
    linears = {n: m for n, m in block_linears(block, prefix).items() if n in plan}
    if not linears:
        return {}
    hooks = collect_hessians(block, linears, inputs)
    errors = {}
    for name, lin in linears.items():
        spec = plan[name]
        H = hooks.hessian(name)
        codes, scales, zeros = gptq_weight(lin.weight, H, spec, params.damp, params.block_size,
                                           params.act_order, params.clip_search)
        q = QuantLinear.from_linear(lin, spec.bits, spec.group_size, spec.symmetric, codes=codes,
                                    scales=scales, zeros=zeros)
        errors[name] = output_error(lin.weight.float(), q.dequantize(), H)
        set_module(block, name[len(prefix) + 1 :], q)
    return errors


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    d = w - wq
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum().clamp_min(1e-12))


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params) -> nn.Module:
    if windows is None:
        raise ValueError("gptq needs calibration windows (a 'calib' input)")
    if params.n_windows is not None:
        windows = windows[: params.n_windows]
    t0 = time.perf_counter()
    inputs = capture_inputs(model, windows, params.batch_size)
    layers = decoder_layers(model)
    errs: dict[str, float] = {}
    for i, block in enumerate(tqdm(layers, desc="gptq blocks")):
        errs.update(quantize_block(block, f"model.layers.{i}", plan, inputs, params))
        with torch.no_grad():
            run_block(block, inputs, out=inputs.hidden)
    model.quant_errors = errs  # read by the stage for its report
    worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", 0.0)
    print(f"[pqflow] gptq: {len(errs)} linears in {time.perf_counter() - t0:.0f}s; "
          f"worst relative output error {worst[1]:.4f} ({worst[0]})", file=sys.stderr)
    return model
