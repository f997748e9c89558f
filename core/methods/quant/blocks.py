"""Run a causal LM one decoder block at a time on cached hidden states.

GPTQ and MREM process the model block by block: the calibration windows are embedded once, the
inputs of block 0 are captured, and each block maps its cached inputs to the next block's. The
extra arguments each block receives (rotary embeddings, mask) are captured per block: families
with sliding and global layers (Gemma 2/3) give each layer type its own mask, and Gemma 3 its own
rotary embedding, so block 0's arguments are not every block's.

Block-wise onloading: the model's weights may stay where they were loaded (CPU memory, or pages of
a memory-mapped safetensors file) while the work is done on a ``device``: :func:`onloaded` moves
one block there and back, and the cached hidden states live on the device or, with ``offload``,
in CPU memory, moved to the device one batch at a time. Peak memory on the device is then one
block, its batch activations and the cached hidden states (or one batch of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pqflow.architectures import block_linears, block_names, decoder_layers

__all__ = ["BlockInputs", "block_linears", "block_names", "capture_inputs", "decoder_layers", "move_block",
           "onloaded", "own_memory", "run_block"]

# The keyword arguments a block is run with; caches and flags are dropped: blocks run stateless.
_KEPT = ("attention_mask", "position_embeddings", "position_ids")


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states ``[n, seqlen, hidden]`` plus the keyword arguments the block they feed is run
    with (``kwargs``); ``layer_kwargs`` holds every block's, as captured (:meth:`for_block`).

    ``device`` is where the blocks compute: batches of ``hidden`` are moved there when it lies
    elsewhere (offloaded); None means wherever ``hidden`` is."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    batch_size: int
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    device: torch.device | None = None

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(0, len(self.hidden), self.batch_size):
            x = self.hidden[i : i + self.batch_size]
            yield i, x if self.device is None else x.to(self.device)

    def for_block(self, i: int) -> BlockInputs:
        """The same hidden states, with block ``i``'s keyword arguments."""
        return replace(self, kwargs=self.layer_kwargs[i])

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        return replace(self, hidden=hidden)


def _portable(v: Any, device: torch.device | None, memo: dict[int, Any]) -> Any:
    """Detached (and moved) tensors; a tensor shared by several blocks stays one tensor."""
    if isinstance(v, torch.Tensor):
        if id(v) not in memo:
            memo[id(v)] = v.detach() if device is None else v.detach().to(device)
        return memo[id(v)]
    if isinstance(v, tuple):
        return tuple(_portable(x, device, memo) for x in v)
    return v


def _one_row_mask(kw: dict[str, Any]) -> dict[str, Any]:
    mask = kw.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] not in (1,):
        # A per-batch mask would not fit a smaller last batch; causal masks are identical per row.
        kw["attention_mask"] = mask[:1]
    return kw


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records what the block would receive and
    returns its input unchanged (block 0 also keeps the hidden states). Attribute reads the model's
    loop makes of its blocks (e.g. a layer type) fall through to the block."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink: _Capture) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: state_dict etc. unchanged
        self._index, self._last, self._sink = index, last, sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kw: Any) -> Any:
        h = args[0] if args else kw["hidden_states"]
        self._sink.record(self._index, h, kw)
        if self._last or self._sink.complete:
            raise _Stop
        return h


class _Capture:
    """What the recorders collect: block 0's inputs for every window, each block's kwargs once."""

    def __init__(self, n_layers: int, n_windows: int, device: torch.device | None, store: torch.device | None) -> None:
        self.kwargs: list[dict[str, Any] | None] = [None] * n_layers
        self.hidden: torch.Tensor | None = None
        self.filled = 0
        self.n_windows = n_windows
        self.device, self.store = device, store
        self._memo: dict[int, Any] = {}

    @property
    def complete(self) -> bool:
        return self.kwargs[-1] is not None

    def record(self, index: int, h: torch.Tensor, kw: dict[str, Any]) -> None:
        if index == 0:
            if self.hidden is None:  # one buffer for all windows: no list of batches to concatenate
                self.hidden = torch.empty((self.n_windows, *h.shape[1:]), dtype=h.dtype,
                                          device=self.store if self.store is not None else h.device)
            self.hidden[self.filled : self.filled + len(h)] = h.detach()
            self.filled += len(h)
        if self.kwargs[index] is None:
            kept = {k: _portable(v, self.device, self._memo) for k, v in kw.items() if k in _KEPT}
            self.kwargs[index] = _one_row_mask(kept)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else next(model.parameters()).device


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str | None = None,
                   offload: bool = False) -> BlockInputs:
    """Inputs of the first decoder block for every window (all windows share one length) and the
    keyword arguments of every block.

    The blocks are replaced by recorders while the model runs, so no block computes (and none
    needs to be on any device): the embedding and the model's own mask and rotary code run where
    they lie. ``device``: where the blocks will compute (kwargs are moved there; hidden states too
    unless ``offload`` keeps them in CPU memory). None: nothing is moved."""
    dev = torch.device(device) if device is not None else None
    store = torch.device("cpu") if offload and dev is not None else dev
    layers = decoder_layers(model)
    n = len(layers)
    sink = _Capture(n, len(windows), dev, store)
    blocks = list(layers)
    for i, b in enumerate(blocks):
        layers[i] = _Recorder(b, i, i == n - 1, sink)
    try:
        where = _input_device(model)
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(where), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, b in enumerate(blocks):
            layers[i] = b
    per_block = [k for k in sink.kwargs if k is not None]
    if sink.hidden is None or len(per_block) != n:
        raise ValueError(f"capture_inputs: the model's forward did not reach its {n} decoder blocks "
                         f"({len(windows)} windows given)")
    return BlockInputs(sink.hidden, per_block[0], batch_size, per_block,
                       dev if offload and dev is not None else None)


def move_block(block: nn.Module, device: torch.device) -> None:
    """Move one block's weights (in place); the one place blocks change device, so that a test can
    count the moves."""
    block.to(device)


def home_device(block: nn.Module) -> torch.device:
    p = next(block.parameters(), None)
    if p is None:
        p = next(block.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def own_memory(block: nn.Module) -> None:
    """Give every tensor of ``block`` its own memory (a copy; same values). A model loaded from
    safetensors computes on pages of the file's mapping, and a mapping is only released once no
    tensor of its file is left: after a block is packed, its float leftovers (norm gains) would
    keep the whole file's pages resident."""
    for mod in block.modules():
        for p in mod.parameters(recurse=False):
            p.data = p.data.clone()
        for name, b in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, b.clone())


@contextmanager
def onloaded(block: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """``block`` with its weights on ``device`` for the duration, then back where they were (with
    any modules the caller swapped in, e.g. packed linears). ``device=None``: computed where it is.

    When the block computes in CPU memory where it lives, it is given its own memory on the way
    out (:func:`own_memory`): what it read from a memory-mapped file can then be unmapped."""
    home = home_device(block)
    dev = home if device is None else torch.device(device)
    move_block(block, dev)
    try:
        yield block
    finally:
        move_block(block, home)
        if dev == home and home.type == "cpu":
            own_memory(block)


def run_block(block: nn.Module, inputs: BlockInputs, out: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of ``block`` for every cached input (grad mode as the caller set it), stored where
    the inputs are stored."""
    res = out if out is not None else torch.empty_like(inputs.hidden)
    for i, x in inputs.batches():
        y = block(x, **inputs.kwargs)
        res[i : i + len(x)] = y[0] if isinstance(y, tuple) else y
    return res
