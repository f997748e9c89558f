"""The integer grid: group layout, scale/zero estimation and (fake) quantization.

A weight ``W[out, in]`` is split along its input columns into groups of ``group_size`` columns
(``None`` = one group per output row). Each group has a scale ``s`` and, for asymmetric grids, an
integer zero point ``z``: ``W ≈ s * (q - z)`` with codes ``q`` in ``[0, 2**bits - 1]``.
Symmetric grids use the fixed zero ``2**(bits - 1)`` (no zero is stored).

Ragged last group: when ``group_size`` does not divide ``in_features`` the last group is
shorter (576 columns in groups of 128 give 4 groups of 128 and one of 64). Every function here
maps columns to groups with :func:`group_index`, so ragged groups need no special case.
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-6  # an all-constant group (e.g. a zeroed row) gets this instead of 0; fp16 keeps it


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


def group_index(in_features: int, group_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Group of each input column, ``[in_features]`` long."""
    cols = torch.arange(in_features, device=device)
    return torch.zeros_like(cols) if group_size is None else cols // group_size


def group_reduce(w: torch.Tensor, gidx: torch.Tensor, n: int, op: str) -> torch.Tensor:
    """Reduce ``w[out, in]`` over the columns of each group: ``[out, n]`` (op: amin, amax, sum)."""
    idx = gidx.expand(w.shape[0], -1)
    out = torch.zeros(w.shape[0], n, dtype=w.dtype, device=w.device)
    return out.scatter_reduce(1, idx, w, op, include_self=False)


def minmax_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scales, zeros)``, both float ``[out, n_groups]``, from the group's range.

    ``shrink`` (scalar or per group) narrows the range before rounding (clipping search).
    """
    w = w.float()
    n = n_groups(w.shape[1], group_size)
    gidx = group_index(w.shape[1], group_size, w.device)
    maxq = 2**bits - 1
    wmin = group_reduce(w, gidx, n, "amin") * shrink
    wmax = group_reduce(w, gidx, n, "amax") * shrink
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax)
        scales = (2 * amax / maxq).clamp_min(MIN_SCALE)
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    else:
        scales = ((wmax - wmin) / maxq).clamp_min(MIN_SCALE)
        zeros = torch.round(-wmin / scales).clamp(0, maxq)
    return scales, zeros


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int | None) -> torch.Tensor:
    """Round ``w`` to the nearest grid point: integer codes (int64) of ``w``'s shape."""
    gidx = group_index(w.shape[1], group_size, w.device)
    s, z = scales[:, gidx], zeros[:, gidx]
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.int64)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int | None) -> torch.Tensor:
    gidx = group_index(codes.shape[1], group_size, codes.device)
    return (codes.to(scales.dtype) - zeros[:, gidx].to(scales.dtype)) * scales[:, gidx]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round-to-nearest reference: ``w`` mapped onto its min/max grid, the scales first rounded
    to ``scale_dtype`` (as stored) when given."""
    s, z = minmax_params(w, bits, group_size, symmetric)
    if scale_dtype is not None:
        s = s.to(scale_dtype).float()
    return dequantize_codes(quantize_codes(w, s, z, bits, group_size), s, z, group_size)


def mse_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               weight: torch.Tensor | None = None, grid: int = 20, max_shrink: float = 0.2,
               scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping search: shrink each group's range by up to ``max_shrink`` and keep
    the candidate with the least (column-weighted) squared rounding error.

    ``weight`` (``[in]``, e.g. the diagonal of XᵀX) weighs columns by how much their inputs
    carry, so the search minimises an output-error proxy rather than plain weight error.
    """
    w = w.float()
    n = n_groups(w.shape[1], group_size)
    gidx = group_index(w.shape[1], group_size, w.device)
    colw = torch.ones(w.shape[1], device=w.device) if weight is None else weight.float()
    best_err = torch.full((w.shape[0], n), float("inf"), device=w.device)
    best_s, best_z = minmax_params(w, bits, group_size, symmetric)
    for i in range(grid + 1):
        shrink = 1.0 - max_shrink * i / grid
        s, z = minmax_params(w, bits, group_size, symmetric, shrink)
        s = s.to(scale_dtype).float()
        q = dequantize_codes(quantize_codes(w, s, z, bits, group_size), s, z, group_size)
        err = group_reduce((q - w).pow(2) * colw, gidx, n, "sum")
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z
