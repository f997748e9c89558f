"""Post-pruning correction of kept weights from calibration activations, without training.

One sequential pass over the decoder: the original model and the pruned one run side by side,
layer by layer, on the same calibration windows. For each kept layer the inputs ``X`` of the
attention's output projection (o) and of the MLP's down projection in the pruned model and a
target ``T`` (what those modules should output) give two statistics, ``G = XᵀX`` and ``C = TᵀX``,
from which

- ``reformation`` (Search-LLM) refits the whole kept weight matrix by least squares,
  ``W' = argmin ‖T - W' X‖² + λ‖W' - W‖²  =  (C + λW)(G + λI)⁻¹`` — with ``target=layer`` and
  ``propagate=False`` this is Search-LLM's ``W X Xₖᵀ (Xₖ Xₖᵀ + λI)⁻¹`` except that the ridge pulls
  towards the kept weights rather than towards zero (so a large λ means "leave W alone");
- ``mask-tuning`` (COMP) fits one real scale per kept input neuron, ``W' = W diag(s)``, from the
  normal equations ``((WᵀW) ⊙ G) s = diag(Wᵀ C)`` (ridge towards ``s = 1``).

Targets: ``layer`` is the module's own output in the original model; ``residual`` is what the
module must add to the pruned residual stream to land on the original hidden state, so errors from
earlier cuts and removed layers are absorbed too. o is corrected before the MLP's input is
computed, so down sees (and fixes) the corrected attention. Where a norm sits on a sublayer's
output before the residual add (Gemma 2/3 sandwich norms, OLMo 2 post-norms) the residual target
is no linear solve, and that sublayer matches its own original output (``layer``) instead.

``refit_inputs`` extends reformation to the input side: q/k/v and gate/up are refit so that, fed
the pruned model's (shifted) normalized hidden states, they reproduce their outputs on the
original model's; this needs only the Grams of those inputs in both models.

The block computation is rebuilt from the architecture adapter's pieces (``attn_input``,
``run_attention``, ``attn_residual``, ``mlp_input``, ``run_mlp``, ``mlp_residual``), each block with
the keyword arguments (mask, rotary embeddings) it receives in the model's own forward: sliding
and global layers differ in both. An MoE block's attention is corrected; its experts are not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pqflow import architectures as arch
from pqflow.methods.importance.common import decoder_layers, has_dense_mlp
from pqflow.methods.prune.common import CommonParams


@dataclass
class Accum:
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    target_sq: float = 0.0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        # float32 products per batch (fast GEMM), float64 running sums (no drift over many batches)
        x = x.reshape(-1, x.shape[-1]).float()
        t = t.reshape(-1, t.shape[-1]).float()
        g, c = (x.T @ x).double(), (t.T @ x).double()
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.target_sq += float((t.double() ** 2).sum())

    def error(self, w: torch.Tensor) -> float:
        """Relative ``‖T - W X‖² / ‖T‖²`` from the statistics alone."""
        w = w.double()
        sq = self.target_sq - 2 * float((w * self.cross).sum()) + float(((w @ self.gram) * w).sum())
        return max(sq, 0.0) / max(self.target_sq, 1e-30)


def reform(w: torch.Tensor, acc: Accum, damping: float) -> torch.Tensor:
    g = acc.gram
    lam = damping * float(g.diagonal().mean())
    a = g + lam * torch.eye(len(g), dtype=g.dtype, device=g.device)
    rhs = acc.cross + lam * w.double()
    return torch.linalg.solve(a, rhs.T).T  # a is symmetric: (rhs a⁻¹)ᵀ = a⁻¹ rhsᵀ


def mask_tune(w: torch.Tensor, acc: Accum, damping: float) -> torch.Tensor:
    wd = w.double()
    a = (wd.T @ wd) * acc.gram
    b = (wd * acc.cross).sum(0)
    lam = damping * float(a.diagonal().mean())
    s = torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype, device=a.device), b + lam)
    return wd * s[None, :]


@dataclass
class CorrectionReport:
    fits: list[dict] = field(default_factory=list)  # one per corrected linear: layer, module, before, after

    def mean_gain(self) -> float:
        pairs = [(r["before"], r["after"]) for r in self.fits]
        return sum(b - a for b, a in pairs) / max(len(pairs), 1)


class _Stop(Exception):
    """Ends a forward pass once a hook has what it came for."""


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def block_kwargs(model: nn.Module, ids: torch.Tensor) -> list[dict[str, Any]]:
    """The keyword arguments (attention mask, rotary embeddings, positions) each decoder block
    receives in the model's forward of ``ids``, captured per block: sliding and global layers get
    different masks, and Gemma 3's different rotary embeddings, so no block's may stand in for
    another's. Captured for one window; masks and embeddings broadcast over the batch."""
    layers = decoder_layers(model)
    got: list[dict[str, Any] | None] = [None] * len(layers)

    def hook(i: int) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(args) > 1:
                raise arch.UnsupportedArchitecture(f"{type(_m).__name__}: decoder blocks called with positional "
                                                   f"arguments beyond the hidden states")
            got[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        arch.backbone(model)(input_ids=ids[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [kw or {} for kw in got]


def block_inputs(model: nn.Module, ids: torch.Tensor, spans: list[slice]) -> torch.Tensor:
    """What the first decoder block receives for every window: the embeddings as the model makes
    them (scaled, multiplied, ... by family), stopping each forward there."""
    got: list[torch.Tensor] = []

    def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append(_first(args, kwargs))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(fn, with_kwargs=True)
    try:
        for b in spans:
            try:
                arch.backbone(model)(input_ids=ids[b], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(got)


def _input_of(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The input ``module`` receives while ``run`` executes (which stops there)."""
    got: list[torch.Tensor] = []

    def fn(_m: nn.Module, args: tuple) -> None:
        got.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(fn)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def _o_input(layer: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """The input of the attention's output projection for block input ``h``."""
    return _input_of(arch.o_input_hook(layer), lambda: arch.run_attention(layer, arch.attn_input(layer, h), **kw))


def _down_input(layer: nn.Module, h_mid: torch.Tensor) -> torch.Tensor:
    """The MLP's inner activation (the down projection's input) for the stream after attention."""
    return _input_of(arch.down_input_hook(layer), lambda: arch.run_mlp(layer, arch.mlp_input(layer, h_mid)))


def rebuild_block(layer: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """One decoder block, piece by piece, on input ``h`` with its keyword arguments ``kw``: o's
    output, the stream after attention, the MLP's output (down's, or the MoE block's) and the
    block's output."""
    a = arch.o_input_hook(layer)(_o_input(layer, h, kw))
    mid = arch.attn_residual(layer, h, a)
    if has_dense_mlp(layer):
        mm = arch.down_input_hook(layer)(_down_input(layer, mid))
    else:
        mm = arch.run_mlp(layer, arch.mlp_input(layer, mid))
    return a, mid, mm, arch.mlp_residual(layer, mid, mm)


def _without_bias(t: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    # The fit is of W X; a bias (kept as it is) is taken off the target first.
    return t if lin.bias is None else t - lin.bias


def _unique(proj: dict[str, arch.Proj], roles: tuple[str, ...]) -> list[arch.Proj]:
    """The distinct linears behind ``roles`` (a fused projection is refit once, all its rows)."""
    seen: dict[int, arch.Proj] = {}
    for r in roles:
        seen.setdefault(id(proj[r].module), proj[r])
    return list(seen.values())


def _apply(fix, lin: nn.Linear, acc: Accum, damping: float, rec: dict, report: CorrectionReport) -> None:
    w = lin.weight
    before = acc.error(w.data)
    new = fix(w.data, acc, damping)
    rec.update(before=before, after=acc.error(new))
    if rec["after"] < before:  # a worse fit (possible only through damping) is not applied
        w.data.copy_(new.to(w.dtype))
    report.fits.append(rec)


@dataclass
class InputAccum:
    """Statistics of a linear's input in both models: ``X_pᵀX_p``, ``X_oᵀX_p`` and ``X_oᵀX_o``.

    The target of a row-cut linear fed the pruned input is its own output on the original input,
    ``T = X_o Wᵀ``, so ``TᵀX_p = W X_oᵀX_p``: every linear reading this input shares these."""

    pp: torch.Tensor | None = None
    op: torch.Tensor | None = None
    oo: torch.Tensor | None = None

    def add(self, xp: torch.Tensor, xo: torch.Tensor) -> None:
        xp = xp.reshape(-1, xp.shape[-1]).float()
        xo = xo.reshape(-1, xo.shape[-1]).float()
        pp, op, oo = (xp.T @ xp).double(), (xo.T @ xp).double(), (xo.T @ xo).double()
        self.pp = pp if self.pp is None else self.pp + pp
        self.op = op if self.op is None else self.op + op
        self.oo = oo if self.oo is None else self.oo + oo

    def for_weight(self, w: torch.Tensor) -> Accum:
        wd = w.double()
        return Accum(self.pp, wd @ self.op, float(((wd @ self.oo) * wd).sum()))


@torch.no_grad()
def correct(original: nn.Module, pruned: nn.Module, kept: list[int], cut: set[int], windows: torch.Tensor,
            p: CommonParams, progress: bool = True) -> CorrectionReport:
    """Correct ``pruned`` in place. ``kept[j]`` is the original index of pruned layer ``j``; ``cut``
    holds the original indices of layers whose width was cut."""
    fix = reform if p.correction == "reformation" else mask_tune
    refit_inputs = p.refit_inputs and p.correction == "reformation"
    o_layers, p_layers = decoder_layers(original), decoder_layers(pruned)
    slot = {orig: j for j, orig in enumerate(kept)}
    bs = p.batch_size
    n = len(windows)
    spans = [slice(s, s + bs) for s in range(0, n, bs)]
    ids = windows.to(original.get_input_embeddings().weight.device)
    # Kept layer j is original layer i's module: it runs with block i's arguments in both models.
    kws = block_kwargs(original, ids)
    h_o = block_inputs(original, ids, spans)
    h_p = h_o.clone()
    report = CorrectionReport()
    for i in tqdm(range(len(o_layers)), desc=p.correction, disable=not progress):
        lo, kw = o_layers[i], kws[i]
        j = slot.get(i)
        after_gap = i > 0 and (i - 1) not in slot  # this layer now also stands in for removed ones
        active = j is not None and (p.correct_all or i in cut or after_gap)
        dense = has_dense_mlp(lo)
        # Each sublayer's own original output: the target asked for, or the one that stays linear.
        own_a = active and (p.correct_target == "layer" or not arch.linear_residual(lo, "attn"))
        own_m = active and dense and (p.correct_target == "layer" or not arch.linear_residual(lo, "mlp"))
        mid_o = torch.empty_like(h_o)
        out_o = torch.empty_like(h_o)
        a_o = torch.empty_like(h_o) if own_a else None
        m_o = torch.empty_like(h_o) if own_m else None
        for b in spans:
            a, mid_o[b], mm, out_o[b] = rebuild_block(lo, h_o[b], kw)
            if a_o is not None:
                a_o[b] = a
            if m_o is not None:
                m_o[b] = mm
        if j is not None and active:
            lp = p_layers[j]
            src = h_p if p.propagate else h_o
            proj = arch.projections(lp)
            o_p = proj["o"]
            if refit_inputs:
                acc_in = InputAccum()
                for b in spans:
                    acc_in.add(arch.attn_input(lp, src[b]), arch.attn_input(lo, h_o[b]))
                for pr in _unique(proj, ("q", "k", "v")):
                    lin = pr.module
                    _apply(fix, lin, acc_in.for_weight(lin.weight.data), p.damping, {"layer": i, "module": pr.name},
                           report)
                del acc_in
            acc_a = Accum()
            xs = []
            for b in spans:
                xa = _o_input(lp, src[b], kw)
                xs.append(xa)
                t = a_o[b] if a_o is not None else arch.residual_delta(lp, "attn", src[b], mid_o[b])
                acc_a.add(xa, _without_bias(t, o_p.module))
            _apply(fix, o_p.module, acc_a, p.damping, {"layer": i, "module": o_p.name}, report)
            mids = [arch.attn_residual(lp, src[b], o_p.module(xa)) for b, xa in zip(spans, xs, strict=True)]
            del xs
            if dense:
                h_next = _correct_mlp(lo, lp, mids, mid_o, out_o, m_o, spans, fix, refit_inputs, i, p, report)
            else:
                h_next = [arch.mlp_residual(lp, hm, arch.run_mlp(lp, arch.mlp_input(lp, hm))) for hm in mids]
            if p.propagate:
                h_p = torch.cat(h_next)
            del mids, h_next
        elif j is not None and p.propagate:
            lp = p_layers[j]
            h_p = torch.cat([_hidden(lp(h_p[b], **kw)) for b in spans])
        h_o = out_o
    return report


def _correct_mlp(lo: nn.Module, lp: nn.Module, mids: list[torch.Tensor], mid_o: torch.Tensor, out_o: torch.Tensor,
                 m_o: torch.Tensor | None, spans: list[slice], fix: Callable, refit_inputs: bool, i: int,
                 p: CommonParams, report: CorrectionReport) -> list[torch.Tensor]:
    """Correct the pruned block's MLP given its stream after attention ``mids`` (per span);
    returns the block's outputs per span."""
    proj = arch.projections(lp)
    if refit_inputs:
        acc_in = InputAccum()
        for b, hm in zip(spans, mids, strict=True):
            acc_in.add(arch.mlp_input(lp, hm), arch.mlp_input(lo, mid_o[b]))
        for pr in _unique(proj, ("gate", "up")):
            lin = pr.module
            _apply(fix, lin, acc_in.for_weight(lin.weight.data), p.damping, {"layer": i, "module": pr.name}, report)
        del acc_in
    down = proj["down"]
    acc_m = Accum()
    xms = []
    for b, hm in zip(spans, mids, strict=True):
        xm = _down_input(lp, hm)
        xms.append(xm)
        t = m_o[b] if m_o is not None else arch.residual_delta(lp, "mlp", hm, out_o[b])
        acc_m.add(xm, _without_bias(t, down.module))
    _apply(fix, down.module, acc_m, p.damping, {"layer": i, "module": down.name}, report)
    return [arch.mlp_residual(lp, hm, down.module(xm)) for hm, xm in zip(mids, xms, strict=True)]
