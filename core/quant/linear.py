"""``QuantLinear``: a linear layer whose weight is stored as bit-packed integer codes.

Storage (what is saved, and all that is kept in memory):

- ``qweight`` — uint8 buffer, the ``out x in`` codes packed row-major (see :mod:`.packing`);
- ``scales`` — ``nn.Parameter [out, n_groups]`` in ``scale_dtype`` (fp16 by default). It is the
  only trainable tensor, so scale-only tuning (PEQA) trains exactly these;
- ``zeros`` — uint8 buffer ``[out, n_groups]`` of integer zero points (empty when symmetric);
- ``bias`` — optional, kept in ``scale_dtype``.

The forward dequantizes with a handful of vectorised tensor ops (unpack, gather the group's
scale/zero per column, multiply) and calls ``F.linear``; gradients reach ``scales``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pqflow.quant.grid import (
    group_index,
    minmax_params,
    n_groups,
    quantize_codes,
)
from pqflow.quant.packing import pack, packed_len, unpack

DTYPE_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def packed_bytes(out_features: int, in_features: int, bits: int, group_size: int | None,
                 scale_dtype: torch.dtype = torch.float16, symmetric: bool = False,
                 bias: bool = False) -> int:
    """Exact bytes of one quantized linear's tensors as stored on disk (codes + scales + zeros
    + bias). The safetensors file adds only its JSON header on top of this."""
    g = n_groups(in_features, group_size)
    sb = DTYPE_BYTES[scale_dtype]
    return (packed_len(out_features * in_features, bits) + out_features * g * sb
            + (0 if symmetric else out_features * g) + (out_features * sb if bias else 0))


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 symmetric: bool = False, bias: bool = False, scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        g = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features * out_features, bits), dtype=torch.uint8))
        self.scales = nn.Parameter(torch.ones(out_features, g, dtype=scale_dtype))
        self.register_buffer("zeros", torch.zeros(0 if symmetric else out_features, g, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype)) if bias else None
        self.register_buffer("gidx", group_index(in_features, group_size), persistent=False)
        self.cache = False  # keep the dequantized weight between calls (inference speed-up)
        self._cached: torch.Tensor | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool = False,
                    codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Quantize ``linear``: round-to-nearest on the min/max grid, or take the given
        ``scales``/``zeros`` (float ``[out, n_groups]``) and optionally precomputed ``codes``."""
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, bits, group_size, symmetric,
                linear.bias is not None, scale_dtype).to(w.device)
        if scales is None:
            scales, zeros = minmax_params(w, bits, group_size, symmetric)
        scales = scales.to(scale_dtype).float()  # round first so the codes fit the stored scales
        if zeros is None:
            zeros = torch.full_like(scales, float(2 ** (bits - 1))) if symmetric else torch.zeros_like(scales)
        if codes is None:
            codes = quantize_codes(w, scales, zeros, bits, group_size)
        q.set_quantized(codes, scales, zeros)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().to(scale_dtype))
        return q

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        if codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features)}")
        self.qweight = pack(codes, self.bits)
        self.scales.data = scales.detach().to(self.scales.dtype).reshape(self.scales.shape).contiguous()
        if not self.symmetric:
            self.zeros = zeros.detach().round().to(torch.uint8).reshape(self.scales.shape).contiguous()
        self._cached = None

    # -- reading ----------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Integer codes ``[out, in]`` (uint8)."""
        return unpack(self.qweight, self.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features)

    def zero_points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.symmetric:
            return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), dtype=dtype, device=self.scales.device)
        return self.zeros.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` the layer computes with (differentiable in ``scales``)."""
        codes = self.codes().to(dtype)
        z = self.zero_points(dtype)
        s = self.scales.to(dtype)
        if self.group_size is not None and self.in_features % self.group_size == 0:
            g = self.group_size  # divisible: a reshape is cheaper than gathering per column
            w = (codes.view(self.out_features, -1, g) - z[..., None]) * s[..., None]
            return w.view(self.out_features, self.in_features)
        return (codes - z[:, self.gidx]) * s[:, self.gidx]

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache or (torch.is_grad_enabled() and self.scales.requires_grad):
            self._cached = None
            return self.dequantize(dtype)
        if self._cached is None or self._cached.dtype != dtype:
            self._cached = self.dequantize(dtype).detach()
        return self._cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_for(x.dtype), bias)

    @property
    def nbytes(self) -> int:
        return packed_bytes(self.out_features, self.in_features, self.bits, self.group_size,
                            self.scales.dtype, self.symmetric, self.bias is not None)

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "bias": self.bias is not None,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class QuantEmbedding(QuantLinear):
    """An embedding table stored like a ``QuantLinear`` weight (``[vocab, dim]``); a lookup
    unpacks only the rows it needs when rows are byte-aligned (``dim % 8 == 0``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None,
                 symmetric: bool = False, scale_dtype: torch.dtype = torch.float16,
                 padding_idx: int | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, bits, group_size, symmetric, False, scale_dtype)
        self.padding_idx = padding_idx
        self.compute_dtype = torch.float32
        self.register_buffer("embed_scale", None, persistent=False)

    def scale_like(self, emb: nn.Module) -> QuantEmbedding:
        """Multiply lookups by ``emb``'s ``embed_scale`` as that embedding does (scaled word
        embeddings); the factor is rebuilt by the architecture, so it is not saved."""
        scale = getattr(emb, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            self.embed_scale = scale.detach().clone()
        return self

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None, symmetric: bool = False,
                       scale_dtype: torch.dtype = torch.float16) -> QuantEmbedding:
        w = emb.weight.detach().float()
        q = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric, scale_dtype, emb.padding_idx)
        scales, zeros = minmax_params(w, bits, group_size, symmetric)
        scales = scales.to(scale_dtype).float()
        q.set_quantized(quantize_codes(w, scales, zeros, bits, group_size), scales, zeros)
        q.compute_dtype = emb.weight.dtype
        return q.scale_like(emb)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        d = self.in_features
        if d % 8:
            return self.dequantize(dtype)[ids]
        per_row = d * self.bits // 8
        byte_idx = ids.reshape(-1, 1) * per_row + torch.arange(per_row, device=ids.device)
        codes = unpack(self.qweight[byte_idx.reshape(-1)], self.bits, ids.numel() * d).view(-1, d).to(dtype)
        flat = ids.reshape(-1)
        s = self.scales[flat].to(dtype)[:, self.gidx]
        z = self.zero_points(dtype)[flat][:, self.gidx]
        return ((codes - z) * s).view(*ids.shape, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        uniq, inv = torch.unique(ids, return_inverse=True)
        out = self.rows(uniq, self.compute_dtype)[inv]
        return out if self.embed_scale is None else out * self.embed_scale.to(self.compute_dtype)


class TiedQuantHead(nn.Module):
    """An output head tied to a :class:`QuantEmbedding`: computes with the embedding's codes and
    scales, so the two can never drift apart and nothing is stored twice."""

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list hides it from state_dict / parameters: no duplicate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding[0].weight_for(x.dtype))
