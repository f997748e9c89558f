"""Post-pruning correction of kept weights from calibration activations, without training.

One sequential pass over the decoder: the original model and the pruned one run side by side,
layer by layer, on the same calibration windows. For each kept layer the inputs ``X`` of o_proj
and down_proj in the pruned model and a target ``T`` (what those modules should output) give two
statistics, ``G = XᵀX`` and ``C = TᵀX``, from which

- ``reformation`` (Search-LLM) refits the whole kept weight matrix by least squares,
  ``W' = argmin ‖T - W' X‖² + λ‖W' - W‖²  =  (C + λW)(G + λI)⁻¹`` — with ``target=layer`` and
  ``propagate=False`` this is Search-LLM's ``W X Xₖᵀ (Xₖ Xₖᵀ + λI)⁻¹`` except that the ridge pulls
  towards the kept weights rather than towards zero (so a large λ means "leave W alone");
- ``mask-tuning`` (COMP) fits one real scale per kept input neuron, ``W' = W diag(s)``, from the
  normal equations ``((WᵀW) ⊙ G) s = diag(Wᵀ C)`` (ridge towards ``s = 1``).

Targets: ``layer`` is the module's own output in the original model; ``residual`` is what the
module must add to the pruned residual stream to land on the original hidden state, so errors from
earlier cuts and removed layers are absorbed too. o_proj is corrected before the MLP's input is
computed, so down_proj sees (and fixes) the corrected attention.

``refit_inputs`` extends reformation to the input side: q/k/v and gate/up are refit so that, fed
the pruned model's (shifted) normalized hidden states, they reproduce their outputs on the
original model's; this needs only the Grams of those inputs in both models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pqflow.methods.importance.common import decoder_layers
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
    a = g + lam * torch.eye(len(g), dtype=g.dtype)
    rhs = acc.cross + lam * w.double()
    return torch.linalg.solve(a, rhs.T).T  # a is symmetric: (rhs a⁻¹)ᵀ = a⁻¹ rhsᵀ


def mask_tune(w: torch.Tensor, acc: Accum, damping: float) -> torch.Tensor:
    wd = w.double()
    a = (wd.T @ wd) * acc.gram
    b = (wd * acc.cross).sum(0)
    lam = damping * float(a.diagonal().mean())
    s = torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), b + lam)
    return wd * s[None, :]


@dataclass
class CorrectionReport:
    layers: list[dict] = field(default_factory=list)

    def mean_gain(self) -> float:
        pairs = [(r["before"], r["after"]) for r in self.layers]
        return sum(b - a for b, a in pairs) / max(len(pairs), 1)


def causal_mask(model: nn.Module, seqlen: int) -> torch.Tensor | None:
    # SDPA is causal on its own when given no mask; other kernels need the mask spelled out.
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return None
    return torch.full((seqlen, seqlen), float("-inf")).triu(1)[None, None]


def _attn_input(layer: nn.Module, h: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
    """The attention's o_proj input for hidden states ``h``."""
    got: list[torch.Tensor] = []
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: got.append(a[0]))
    try:
        layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pos, attention_mask=mask)
    finally:
        handle.remove()
    return got[0]


def _mlp_input(layer: nn.Module, h_mid: torch.Tensor) -> torch.Tensor:
    m = layer.mlp
    u = layer.post_attention_layernorm(h_mid)
    return m.act_fn(m.gate_proj(u)) * m.up_proj(u)


def _apply(fix, lin: nn.Linear, acc: Accum, damping: float, rec: dict, report: CorrectionReport) -> None:
    w = lin.weight
    before = acc.error(w.data)
    new = fix(w.data, acc, damping)
    rec.update(before=before, after=acc.error(new))
    if rec["after"] < before:  # a worse fit (possible only through damping) is not applied
        w.data.copy_(new.to(w.dtype))
    report.layers.append(rec)


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
    h_o = original.model.embed_tokens(windows)
    h_p = h_o.clone()
    pos_ids = torch.arange(windows.shape[1])[None, :]
    pos = original.model.rotary_emb(h_o[:1], position_ids=pos_ids)
    mask = causal_mask(original, windows.shape[1])
    report = CorrectionReport()
    n = len(windows)
    spans = [slice(s, s + bs) for s in range(0, n, bs)]
    for i in tqdm(range(len(o_layers)), desc=p.correction, disable=not progress):
        lo = o_layers[i]
        j = slot.get(i)
        after_gap = i > 0 and (i - 1) not in slot  # this layer now also stands in for removed ones
        active = j is not None and (p.correct_all or i in cut or after_gap)
        mid_o = torch.empty_like(h_o)
        out_o = torch.empty_like(h_o)
        a_o = torch.empty_like(h_o) if active and p.correct_target == "layer" else None
        m_o = torch.empty_like(h_o) if active and p.correct_target == "layer" else None
        for b in spans:
            x = h_o[b]
            a = lo.self_attn.o_proj(_attn_input(lo, x, pos, mask))
            mid_o[b] = x + a
            mm = lo.mlp.down_proj(_mlp_input(lo, x + a))
            out_o[b] = x + a + mm
            if a_o is not None:
                a_o[b], m_o[b] = a, mm
        if j is not None and active:
            lp = p_layers[j]
            src = h_p if p.propagate else h_o
            attn, mlp = lp.self_attn, lp.mlp
            if refit_inputs:
                acc_in = InputAccum()
                for b in spans:
                    acc_in.add(lp.input_layernorm(src[b]), lo.input_layernorm(h_o[b]))
                for name in ("q_proj", "k_proj", "v_proj"):
                    lin = getattr(attn, name)
                    _apply(fix, lin, acc_in.for_weight(lin.weight.data), p.damping, {"layer": i, "module": name}, report)
                del acc_in
            acc_a = Accum()
            xs = []
            for b in spans:
                xa = _attn_input(lp, src[b], pos, mask)
                xs.append(xa)
                acc_a.add(xa, a_o[b] if a_o is not None else mid_o[b] - src[b])
            _apply(fix, attn.o_proj, acc_a, p.damping, {"layer": i, "module": "o_proj"}, report)
            mids = [src[b] + attn.o_proj(xa) for b, xa in zip(spans, xs, strict=True)]
            del xs
            if refit_inputs:
                acc_in = InputAccum()
                for b, hm in zip(spans, mids, strict=True):
                    acc_in.add(lp.post_attention_layernorm(hm), lo.post_attention_layernorm(mid_o[b]))
                for name in ("gate_proj", "up_proj"):
                    lin = getattr(mlp, name)
                    _apply(fix, lin, acc_in.for_weight(lin.weight.data), p.damping, {"layer": i, "module": name}, report)
                del acc_in
            acc_m = Accum()
            xms = []
            for b, hm in zip(spans, mids, strict=True):
                xm = _mlp_input(lp, hm)
                xms.append(xm)
                acc_m.add(xm, m_o[b] if m_o is not None else out_o[b] - hm)
            _apply(fix, mlp.down_proj, acc_m, p.damping, {"layer": i, "module": "down_proj"}, report)
            if p.propagate:
                h_p = torch.cat([hm + mlp.down_proj(xm) for hm, xm in zip(mids, xms, strict=True)])
            del mids, xms
        elif j is not None and p.propagate:
            lp = p_layers[j]
            h_p = torch.cat([lp(h_p[b], position_embeddings=pos, attention_mask=mask) for b in spans])
        h_o = out_o
    return report
