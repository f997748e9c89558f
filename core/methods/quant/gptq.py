"""GPTQ: quantize a linear's columns one at a time and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian ``H = XᵀX`` of the layer's inputs
(Frantar et al., 2022). Blocks are processed in order: block ``i`` is calibrated on the outputs
of the already-quantized blocks ``< i``, from the calibration windows, not from fp statistics.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from pqflow.methods.quant.blocks import (
    BlockInputs,
    block_linears,
    block_names,
    capture_inputs,
    decoder_layers,
    onloaded,
    run_block,
)
from pqflow.methods.quant.plan import LinearSpec, Plan
from pqflow.quant.grid import minmax_params, mse_params, n_groups
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import set_module
from pqflow.recipe import MAX_BATCH, MAX_GROUP, MAX_WINDOWS

NEEDS_CALIBRATION = True
ONLOADS = True  # quantize() takes ``device`` and moves one decoder block at a time there


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    damp: float = Field(0.01, gt=0, le=1e6, description="damping added to H's diagonal, fraction of its mean")
    block_size: int = Field(128, ge=1, le=MAX_GROUP, description="columns updated lazily together (rounded up to a multiple of the group size)")
    act_order: bool = Field(False, description="quantize columns by decreasing H diagonal (group params then come from the original weights)")
    clip_search: bool = Field(True, description="per-group range shrink search weighted by H's diagonal")
    n_windows: int | None = Field(128, ge=1, le=MAX_WINDOWS, description="calibration windows used (null = all)")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="windows per block forward")
    offload_hidden: bool = Field(False, description="keep the cached hidden states in CPU memory and move one batch "
                                 "at a time to the compute device (saves n_windows x seqlen x hidden on the device)")


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

    Returns ``(codes [out, in] uint8, scales [out, G], zeros [out, G])`` (scales fp16-exact), on
    the weight's device. Without ``act_order`` each group's scale/zero is chosen when its first
    column is reached, from the error-updated weights (the usual GPTQ); with it, groups are fixed
    up front from the original weights, so that groups stay contiguous in storage whatever the
    column order. An all-zero Hessian (an MoE expert no calibration token was routed to) is taken
    as the identity: round-to-nearest on the (clipped) grid, the weights kept.
    """
    return _gptq(weight.detach().float().clone(), hessian.detach().float().clone(), spec, damp, block_size,
                 act_order, clip_search)


def _gptq(W: torch.Tensor, H: torch.Tensor, spec: LinearSpec, damp: float, block_size: int, act_order: bool,
          clip_search: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gptq_weight` on fp32 ``W`` and ``H`` it may overwrite (no copies of its own)."""
    dev = W.device
    rows, cols = W.shape
    g = spec.group_size
    maxq = 2**spec.bits - 1
    dead = torch.diag(H) == 0
    if bool(dead.all()):  # no input reached this linear: nothing to weigh the columns by
        H.diagonal().fill_(1)
        dead = torch.zeros_like(dead)
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
            scales = torch.empty(rows, G, device=dev)
            zeros = torch.empty(rows, G, device=dev)
            for j in range(G):
                sl = slice(j * g, min((j + 1) * g, cols))
                scales[:, j : j + 1], zeros[:, j : j + 1] = _group_params(W[:, sl], spec, diag[sl], clip_search)
    else:
        scales = torch.empty(rows, G, device=dev)
        zeros = torch.empty(rows, G, device=dev)
    perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = _inverse_cholesky(H)
    del H
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)
    # Blocks aligned on group boundaries, so a group's columns lie inside one block.
    bs = block_size if static else -(-max(block_size, gsz) // gsz) * gsz
    # Group of each (permuted) column, as Python ints: no device round trip per column.
    order = perm.tolist() if perm is not None else range(cols)
    gidx = [c // gsz for c in order] if g is not None else [0] * cols
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            gi = gidx[c]
            if not static and c % gsz == 0:
                sl = slice(i, min(i + gsz, i2 - i1))
                s, z = _group_params(W1[:, sl], spec, diag[c : c + (sl.stop - sl.start)], clip_search)
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q, deq = _quant_col(w, scales[:, gi], zeros[:, gi], maxq)
            codes[:, c] = q.to(torch.uint8)  # an integer in [0, maxq]: exact
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹; more damping when H is numerically not positive definite.
    At most two ``[in, in]`` matrices besides ``H`` live at once."""
    extra = 0.0
    for _ in range(6):
        try:
            Hd = H if extra == 0 else H + extra * torch.eye(len(H), device=H.device) * torch.mean(torch.diag(H))
            inv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
            del Hd
            return torch.linalg.cholesky(inv, upper=True)
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
        self._scaled: set[str] = set()
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

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def hessian(self, name: str) -> torch.Tensor | None:
        """``2 XᵀX / n`` of the linear's inputs (scaled in place, once: one matrix per group of
        linears sharing an input); None when no input reached it (an MoE expert no token chose)."""
        owner = self.owner(name)
        if owner not in self.sums:
            return None
        if owner not in self._scaled:
            self.sums[owner].mul_(2.0 / self.count[owner])
            self._scaled.add(owner)
        return self.sums[owner]

    def release(self, name: str) -> None:
        """Free the matrix of ``name``'s group (all its linears are done)."""
        self.sums.pop(self.owner(name), None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


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
    each linear's relative output error proxy ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``. Each Hessian is freed
    as soon as the last linear reading its input is done."""
    linears = {n: m for n, m in block_linears(block, prefix).items() if n in plan}
    if not linears:
        return {}
    hooks = collect_hessians(block, linears, inputs)
    left = Counter(hooks.owner(n) for n in linears)
    errors = {}
    for name, lin in linears.items():
        spec = plan[name]
        H = hooks.hessian(name)
        if H is None:  # never called: weigh every column alike (see gptq_weight)
            H = torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device)
        codes, scales, zeros = gptq_weight(lin.weight, H, spec, params.damp, params.block_size,
                                           params.act_order, params.clip_search)
        q = QuantLinear.from_linear(lin, spec.bits, spec.group_size, spec.symmetric, codes=codes,
                                    scales=scales, zeros=zeros)
        del codes
        errors[name] = output_error(lin.weight.float(), q.dequantize(), H)
        set_module(block, name[len(prefix) + 1 :], q)
        left[hooks.owner(name)] -= 1
        if left[hooks.owner(name)] == 0:
            hooks.release(name)
        del H
    return errors


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    d = w - wq
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum().clamp_min(1e-12))


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params,
             device: torch.device | str | None = None) -> nn.Module:
    """GPTQ block by block. ``device``: where each block computes; the blocks are moved there one
    at a time and back (block-wise onloading), so the model may stay in CPU memory. None: every
    block computes where its weights are."""
    if windows is None:
        raise ValueError("gptq needs calibration windows (a 'calib' input)")
    if params.n_windows is not None:
        windows = windows[: params.n_windows]
    t0 = time.perf_counter()
    inputs = capture_inputs(model, windows, params.batch_size, device, params.offload_hidden)
    errs: dict[str, float] = {}
    names = block_names(model)
    for i, block in enumerate(tqdm(decoder_layers(model), desc="gptq blocks")):
        with onloaded(block, device):
            x = inputs.for_block(i)
            errs.update(quantize_block(block, names[i], plan, x, params))
            with torch.no_grad():
                run_block(block, x, out=inputs.hidden)
    model.quant_errors = errs  # read by the stage for its report
    worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", 0.0)
    print(f"[pqflow] gptq: {len(errs)} linears in {time.perf_counter() - t0:.0f}s; "
          f"worst relative output error {worst[1]:.4f} ({worst[0]})", file=sys.stderr)
    return model
