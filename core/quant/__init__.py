"""Packed low-bit weights: the grid, bit-packing, ``QuantLinear`` and the ``pqflow-quant``
model format."""

from pqflow.quant.linear import QuantEmbedding, QuantLinear, TiedQuantHead, packed_bytes

__all__ = ["QuantEmbedding", "QuantLinear", "TiedQuantHead", "packed_bytes"]
