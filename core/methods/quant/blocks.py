"""Run a causal LM one decoder block at a time on cached hidden states.

GPTQ and MREM process the model block by block: the calibration windows are embedded once, the
inputs of block 0 are captured, and each block maps its cached inputs to the next block's. The
extra arguments a block receives (rotary embeddings, mask) are captured with the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states ``[n, seqlen, hidden]`` plus the keyword arguments each batch is run with."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    batch_size: int

    def batches(self):
        for i in range(0, len(self.hidden), self.batch_size):
            yield i, self.hidden[i : i + self.batch_size]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected decoder blocks at model.model.layers")
    return layers


def _portable(v: Any) -> Any:
    # Caches and flags are dropped: blocks run stateless, without KV cache.
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_portable(x) for x in v)
    return v


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Inputs of the first decoder block for every window (all windows share one length)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple, kw: dict) -> None:
        hidden.append(args[0] if args else kw["hidden_states"])
        if not kwargs:
            kwargs.update({k: _portable(v) for k, v in kw.items()
                           if k in ("attention_mask", "position_embeddings", "position_ids")})
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i : i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] not in (1,):
        # A per-batch mask would not fit a smaller last batch; causal masks are identical per row.
        kwargs["attention_mask"] = mask[:1]
    return BlockInputs(torch.cat(hidden), kwargs, batch_size)


def run_block(block: nn.Module, inputs: BlockInputs, out: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of ``block`` for every cached input (grad mode as the caller set it)."""
    res = out if out is not None else torch.empty_like(inputs.hidden)
    for i, x in inputs.batches():
        y = block(x, **inputs.kwargs)
        res[i : i + len(x)] = y[0] if isinstance(y, tuple) else y
    return res


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{n}": m for n, m in block.named_modules() if type(m) is nn.Linear}
