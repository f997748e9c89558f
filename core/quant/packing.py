"""Bit-packing of integer codes into a flat uint8 stream.

Codes are laid out row-major and packed in chunks of 8 codes: 8 codes of ``b`` bits fill exactly
``b`` bytes, so 2-, 3- and 4-bit codes share one scheme (3-bit: 8 codes in 3 bytes) and no code
straddles a chunk. The stream is padded with zero codes to a whole chunk, so a matrix of ``n``
codes takes ``ceil(n / 8) * b`` bytes. When a row length is a multiple of 8, rows start on byte
boundaries (``row * in_features * b / 8``), which lets embeddings unpack only the rows they gather.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_len(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed."""
    _check_bits(bits)
    if bits == 8:
        return numel
    return -(-numel // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, row-major) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits}) for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).contiguous()
    pad = (-flat.numel()) % 8
    chunks = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (chunks << shifts).sum(dim=1)  # at most 8 * 4 = 32 bits used: no overflow in int64
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1).contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    if bits == 4:  # the common case gets a cheaper path: two codes per byte, low nibble first
        p = packed.view(-1, 1)
        return torch.cat([p & 0x0F, p >> 4], dim=1).reshape(-1)[:numel]
    if bits == 2:
        p = packed.view(-1, 1)
        return torch.cat([p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6], dim=1).reshape(-1)[:numel]
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=packed.device) * 8
    word = (packed.view(-1, bits).to(torch.int32) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]
