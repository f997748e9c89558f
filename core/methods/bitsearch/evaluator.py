"""Measure an allocation: fake-quantize the model as ``quantize`` would and score a held-out batch.

Every trial only swaps weight tensors: the codes and scales of each (module, choice) are computed
once with the quantization engine's own grid code and kept (one byte per code) in a size-capped
cache; a module is dequantized when an allocation changes its choice. The model runs one
decoder block at a time over the whole batch, and the hidden states entering every block are
kept for a few recent allocations, so a candidate that first differs from one of them at block
``i`` re-runs only blocks ``i..L`` (sensitivity probes of one layer, and mutations of one
incumbent, are much cheaper than full forwards).

Objectives (lower is better): ``kl`` — mean per-token KL(full model || quantized) over the
batch; ``nll`` — mean next-token NLL (``ppl`` is its exp, reported alongside).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pqflow import architectures
from pqflow.methods.bitsearch.space import KEEP_BITS, Choice, SearchSpace, layer_of
from pqflow.quant.grid import dequantize_codes, minmax_params, quantize_codes

# Keyword arguments of a block call that are no input of its computation (the KV cache and its
# switch): blocks run stateless here.
_STATE_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


@dataclass
class QWeight:
    """One module's weight under one choice, kept compact: integer codes (one byte each) with
    their group scales and zeros, or the fp16 weight of a module kept in floating point."""

    codes: torch.Tensor | None  # uint8 [out, in]
    scales: torch.Tensor | None  # float32 (fp16-exact) [out, groups]
    zeros: torch.Tensor | None
    group_size: int | None
    dense: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(dtype)
        assert self.codes is not None and self.scales is not None and self.zeros is not None
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size).to(dtype)

    @property
    def nbytes(self) -> int:
        ts = [self.dense] if self.dense is not None else [self.codes, self.scales, self.zeros]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int | None) -> QWeight:
        return cls(codes.to(torch.uint8), scales.float(), zeros.float(), group_size)

    @classmethod
    def kept(cls, w: torch.Tensor) -> QWeight:
        return cls(None, None, None, None, w.to(torch.float16))  # quantize keeps the float remainder in fp16


# (module name, fp weight, choice, symmetric) -> the weight the quantized module computes with
WeightFn = Callable[[str, torch.Tensor, Choice, bool], QWeight]


def grid_weight(w: torch.Tensor, choice: Choice, symmetric: bool, grid_params: Callable = minmax_params) -> QWeight:
    """Round-to-nearest on the grid ``grid_params`` picks, with fp16 scales as ``QuantLinear`` stores them."""
    if choice.bits == KEEP_BITS:
        return QWeight.kept(w)
    s, z = grid_params(w, choice.bits, choice.group_size, symmetric)
    s = s.to(torch.float16).float()
    return QWeight.from_codes(quantize_codes(w, s, z, choice.bits, choice.group_size), s, z, choice.group_size)


def rtn_weight(name: str, w: torch.Tensor, choice: Choice, symmetric: bool) -> QWeight:
    """Round-to-nearest exactly as ``QuantLinear.from_linear`` stores it."""
    del name
    return grid_weight(w, choice, symmetric)


class _Stop(Exception):
    pass


@dataclass
class BlockCalls:
    """The input of the first block and the keyword arguments each block is called with (its
    mask and rotary embedding: they differ between sliding and global layers)."""

    hidden: torch.Tensor
    kwargs: list[dict[str, Any]]


def _detached(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detached(x) for x in v)
    return v


@torch.no_grad()
def capture_block_calls(model: nn.Module, windows: torch.Tensor) -> BlockCalls:
    """One forward of all ``windows`` as one batch, stopped when the last block is called."""
    layers = architectures.decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def grab(_mod: nn.Module, args: tuple, kw: dict) -> None:
        if not hidden:
            hidden.append(args[0] if args else kw["hidden_states"])
        kwargs.append({k: _detached(v) for k, v in kw.items() if k != "hidden_states" and k not in _STATE_KWARGS})
        if len(kwargs) == len(layers):
            raise _Stop

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        model(input_ids=windows, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return BlockCalls(hidden[0], kwargs)


@dataclass
class Measure:
    objective: float
    nll: float
    kl: float | None
    seconds: float
    start_layer: int  # first block that had to run (0 = full forward)


class WeightCache:
    """Quantized weights per (module, choice), least recently used dropped beyond ``cap_bytes``."""

    def __init__(self, fp: dict[str, torch.Tensor], symmetric: bool, weight_fn: WeightFn, cap_bytes: int) -> None:
        self.fp, self.symmetric, self.weight_fn, self.cap = fp, symmetric, weight_fn, cap_bytes
        self._d: OrderedDict[tuple[str, Choice], QWeight] = OrderedDict()
        self._bytes = 0

    def get(self, module: str, choice: Choice) -> QWeight:
        key = (module, choice)
        q = self._d.get(key)
        if q is not None:
            self._d.move_to_end(key)
            return q
        q = self.weight_fn(module, self.fp[module], choice, self.symmetric)
        self._d[key] = q
        self._bytes += q.nbytes
        while self._bytes > self.cap and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self._bytes -= old.nbytes
        return q

    def weight(self, module: str, choice: Choice) -> torch.Tensor:
        return self.get(module, choice).dequantize(self.fp[module].dtype)


class Evaluator:
    """Scores allocations of ``space`` on ``windows`` (``[n, seqlen]`` held-out tokens)."""

    def __init__(self, model: nn.Module, space: SearchSpace, windows: torch.Tensor, objective: str = "kl",
                 weight_fn: WeightFn = rtn_weight, cache_mb: int = 2000, trajectories: int = 3,
                 batch_size: int = 8) -> None:
        if objective not in ("kl", "nll"):
            raise ValueError(f"objective '{objective}': expected 'kl' or 'nll'")
        self.model, self.space, self.windows, self.objective = model, space, windows, objective
        self.linears = {n: model.get_submodule(n) for n in space.modules}
        self.fp = {n: m.weight.data for n, m in self.linears.items()}
        self.cache = WeightCache(self.fp, space.symmetric, weight_fn, cache_mb * 2**20)
        self.blocks = architectures.decoder_layers(model)
        prefix = {layer_of(n) for n in space.modules}
        self.layer_names = [f"{p}" for p in sorted(prefix, key=lambda s: int(s.rsplit(".", 1)[1]))]
        self.layer_modules = [[n for n in space.modules if layer_of(n) == p] for p in self.layer_names]
        self.n_traj = trajectories
        self._traj: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._current: dict[str, Choice | None] = dict.fromkeys(space.modules)
        with torch.no_grad():
            self.inputs = capture_block_calls(model, windows)
            self.ref_logp: torch.Tensor | None = None
            self._fp_key = self._key({})
            hidden = self._run_layers(self.inputs.hidden, 0)
            self._traj[self._fp_key] = hidden
            logits = self._logits(hidden[-1])
            if objective == "kl":
                self.ref_logp = torch.cat([F.log_softmax(x, dim=-1) for x in logits])
            self.fp_nll = self._nll(logits)

    # -- plumbing ------------------------------------------------------------------------------
    def _key(self, choices: dict[str, Choice]) -> tuple:
        return tuple(tuple(choices.get(m) for m in mods) for mods in self.layer_modules)

    def _run_layers(self, h: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Hidden states entering blocks ``start..L`` (last = final block output)."""
        out = [h]
        for i in range(start, len(self.blocks)):
            y = self.blocks[i](h, **self.inputs.kwargs[i])
            h = y[0] if isinstance(y, tuple) else y
            out.append(h)
        return out

    def _logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [architectures.output_logits(self.model, h[i : i + 1])[0, :-1].float() for i in range(len(h))]

    def _nll(self, logits: list[torch.Tensor]) -> float:
        tot = sum(F.cross_entropy(lg, w[1:], reduction="sum").item() for lg, w in zip(logits, self.windows, strict=True))
        return tot / sum(len(w) - 1 for w in self.windows)

    def _kl(self, logits: list[torch.Tensor]) -> float:
        assert self.ref_logp is not None
        n = logits[0].shape[0]
        tot = 0.0
        for i, lg in enumerate(logits):
            ref = self.ref_logp[i * n : (i + 1) * n]
            tot += (ref.exp() * (ref - F.log_softmax(lg, dim=-1))).sum().item()
        return tot / (n * len(logits))

    def _apply(self, choices: dict[str, Choice]) -> None:
        for m, lin in self.linears.items():
            c = choices.get(m)
            if self._current[m] != c:
                lin.weight.data = self.fp[m] if c is None else self.cache.weight(m, c)
                self._current[m] = c

    def restore(self) -> None:
        """Put the full-precision weights back."""
        self._apply({})

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_modules(self, choices: dict[str, Choice]) -> Measure:
        """Score the model with ``choices`` applied (modules absent stay full precision)."""
        t0 = time.perf_counter()
        key = self._key(choices)
        start, base = 0, None
        for k, traj in self._traj.items():
            same = 0
            while same < len(key) and k[same] == key[same]:
                same += 1
            if same > start or base is None:
                start, base = same, (k, traj)
        assert base is not None
        self._apply(choices)
        hidden = base[1][: start + 1] + self._run_layers(base[1][start], start)[1:]
        if key != self._fp_key:  # the full-precision trajectory always stays
            self._traj[key] = hidden
            self._traj.move_to_end(key)
            while len(self._traj) > self.n_traj + 1:
                del self._traj[next(k for k in self._traj if k != self._fp_key)]
        logits = self._logits(hidden[-1])
        nll = self._nll(logits)
        kl = self._kl(logits) if self.ref_logp is not None else None
        obj = kl if self.objective == "kl" else nll
        return Measure(float(obj), nll, kl, time.perf_counter() - t0, start)

    def measure(self, alloc: Sequence[int]) -> Measure:
        return self.measure_modules(self.space.module_choices(alloc))

    @staticmethod
    def ppl(m: Measure) -> float:
        return math.exp(m.nll)
