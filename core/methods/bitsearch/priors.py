"""Priors: how much damage each unit takes at each precision, before any search.

``damage[unit, choice] = w[layer] * err[unit, choice]`` where ``err`` is the relative output
error of the unit's linears under that choice (activation-weighted rounding error from the
calibration statistics, as a fraction of the output energy) and ``w`` says how much the layer
matters. The importance sources for ``w``:

- ``mi`` (QPruner): mutual information between a layer's output hidden states and the next-token
  targets on calibration tokens — hidden states clustered (random projection + k-means), targets
  bucketed by frequency, plug-in estimate with the Miller-Madow correction;
- ``importance``: the ``importance`` stage's per-layer scores;
- ``sensitivity``: measured loss increase when only that layer is quantized at a probe choice,
  which also fixes the scale of ``w`` so that ``damage`` predicts the objective itself;
- ``error``: every layer alike (``w = 1``), pure activation-weighted rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pqflow import architectures
from pqflow.calibration import Calibration
from pqflow.methods.bitsearch.evaluator import Evaluator, WeightCache
from pqflow.methods.bitsearch.space import Choice, SearchSpace, layer_of

PRIORS = ("mi", "importance", "sensitivity", "error")


def channel_weights(calib: Calibration | None, module: str, in_features: int) -> torch.Tensor:
    """Per-input-channel energy ``Σ x_j²`` over the calibration tokens (ones when unknown)."""
    if calib is not None:
        try:
            s = calib.act_norm(module).float() ** 2
            if s.numel() == in_features:
                return s
        except KeyError:
            pass
    return torch.ones(in_features)


@torch.no_grad()
def relative_errors(space: SearchSpace, cache: WeightCache, calib: Calibration | None, max_rows: int | None = 128,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Per module, ``Σ_j s_j‖ΔW[:, j]‖² / Σ_j s_j‖W[:, j]‖²`` for every choice (a diagonal
    approximation of the relative output error ``‖ΔW X‖² / ‖W X‖²``).

    Output rows are quantized independently of each other (RTN and GPTQ alike), so the error is
    measured exactly on an evenly spaced subset of ``max_rows`` rows: the table is a prior, and
    quantizing every module at every choice would cost more than the search itself."""
    out: dict[str, np.ndarray] = {}
    for m in tqdm(space.modules, desc="rounding errors", disable=not progress):
        w_full = cache.fp[m]
        rows = w_full.shape[0]
        idx = torch.arange(rows) if max_rows is None or rows <= max_rows else \
            torch.linspace(0, rows - 1, max_rows).round().long()
        w = w_full[idx].float()
        s = channel_weights(calib, m, w.shape[1])
        ref = float((w.pow(2).sum(0) * s).sum()) or 1.0
        errs = []
        for c in space.choices:
            q = cache.weight_fn(m, w, c, space.symmetric).dequantize(torch.float32)
            errs.append(float(((q - w).pow(2).sum(0) * s).sum()) / ref)
        out[m] = np.array(errs)
    return out


def unit_errors(space: SearchSpace, errs: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([sum(errs[m] for m in mods) for mods in space.unit_modules])


def layer_index(space: SearchSpace) -> tuple[list[str], np.ndarray]:
    """Layer prefixes in order and, per unit, the index of the layer it belongs to."""
    layers = sorted({layer_of(m) for m in space.modules}, key=lambda s: int(s.rsplit(".", 1)[1]))
    pos = {p: i for i, p in enumerate(layers)}
    return layers, np.array([pos[layer_of(mods[0])] for mods in space.unit_modules])


def damage_table(space: SearchSpace, err_unit: np.ndarray, layer_w: np.ndarray) -> np.ndarray:
    _, idx = layer_index(space)
    w = np.maximum(np.asarray(layer_w, dtype=np.float64), 0.0)
    w = np.maximum(w, 1e-3 * (w.mean() if w.mean() > 0 else 1.0))  # no layer is free to ruin
    return w[idx][:, None] * err_unit


# -- importance sources ----------------------------------------------------------------------


@torch.no_grad()
def layer_outputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = True) -> list[torch.Tensor]:
    """Every decoder layer's output hidden states, ``[tokens, hidden]`` each."""
    layers = architectures.decoder_layers(model)
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(
        lambda _m, _a, y, i=i: outs[i].append((y[0] if isinstance(y, tuple) else y).reshape(-1, y_dim(y)).float()))
        for i, layer in enumerate(layers)]
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="hidden states", disable=not progress):
            architectures.backbone(model)(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in outs]


def y_dim(y: torch.Tensor | tuple) -> int:
    return (y[0] if isinstance(y, tuple) else y).shape[-1]


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` (k-means++ seeding, Lloyd iterations)."""
    n = len(x)
    k = min(k, n)
    centers = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        c = x[int(torch.multinomial(probs, 1, generator=gen))]
        centers.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    cen = torch.stack(centers)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, cen).argmin(1)
        sums = torch.zeros_like(cen).index_add_(0, labels, x)
        cnt = torch.bincount(labels, minlength=k).float()[:, None]
        cen = torch.where(cnt > 0, sums / cnt.clamp_min(1), cen)
    return labels


def discrete_mi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Plug-in mutual information (nats) of two label vectors, Miller-Madow bias-corrected."""
    n = len(a)
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)
    p = joint / n
    pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa @ pb)[nz]).log()).sum())
    bias = ((pa > 0).sum().item() - 1) * ((pb > 0).sum().item() - 1) / (2 * n)
    return mi - bias


def mutual_information(model: nn.Module, windows: torch.Tensor, clusters: int = 64, target_buckets: int = 64,
                       proj_dim: int = 32, seed: int = 0, progress: bool = True) -> np.ndarray:
    """``I(H_l; Y)`` per decoder layer: ``H_l`` its output at a position, ``Y`` the next token."""
    hidden = layer_outputs(model, windows[:, :-1], progress=progress)
    y = windows[:, 1:].reshape(-1)
    counts = torch.bincount(y)
    top = torch.argsort(counts, descending=True, stable=True)[: target_buckets - 1]
    bucket = torch.full((int(counts.numel()),), target_buckets - 1, dtype=torch.long)
    bucket[top] = torch.arange(len(top))
    yb = bucket[y]
    gen = torch.Generator().manual_seed(seed)
    d = hidden[0].shape[1]
    proj = torch.randn(d, min(proj_dim, d), generator=gen) / math.sqrt(d)
    out = []
    for h in hidden:
        # RMS-normalise first: the final norm does the same before the head, and the residual
        # stream's scale grows with depth, which would otherwise dominate the clustering.
        h = h / h.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
        out.append(discrete_mi(kmeans(h @ proj, clusters, 15, gen), yb))
    return np.array(out)


def sensitivity(evaluator: Evaluator, probe: Choice, progress: bool = True) -> tuple[np.ndarray, float]:
    """Objective increase per decoder layer when only that layer's linears use ``probe``;
    returns ``(increase per layer, seconds)``."""
    # The full-precision objective is known without a forward: the evaluator scored that model
    # when it was built (KL to itself is exactly 0, its NLL is fp_nll).
    base = 0.0 if evaluator.objective == "kl" else evaluator.fp_nll
    deltas, secs = [], 0.0
    for mods in tqdm(evaluator.layer_modules, desc="sensitivity", disable=not progress):
        r = evaluator.measure_modules(dict.fromkeys(mods, probe))
        deltas.append(r.objective - base)
        secs += r.seconds
    evaluator.restore()
    return np.array(deltas), secs


def prior_weights(kind: str, space: SearchSpace, err_unit: np.ndarray, *,
                  mi: Callable[[], np.ndarray], importance: Callable[[], np.ndarray | None],
                  sens: Callable[[], np.ndarray], probe: int) -> np.ndarray:
    """Per-layer weights ``w`` for :func:`damage_table` from the named source."""
    layers, idx = layer_index(space)
    if kind == "error":
        return np.ones(len(layers))
    if kind == "mi":
        return np.maximum(mi(), 0.0)
    if kind == "importance":
        scores = importance()
        if scores is None:
            raise ValueError("prior 'importance' needs the importance stage's output (input 'importance')")
        if len(scores) != len(layers):
            raise ValueError(f"importance scores have {len(scores)} layers, the model {len(layers)}")
        s = np.asarray(scores, dtype=np.float64)
        return s - min(0.0, s.min())  # some scores are signed; shift so the least important is 0
    if kind == "sensitivity":
        delta = sens()
        per_layer_err = np.zeros(len(layers))
        np.add.at(per_layer_err, idx, err_unit[:, probe])
        return np.maximum(delta, 0.0) / np.maximum(per_layer_err, 1e-12)
    raise ValueError(f"prior '{kind}': expected one of {PRIORS}")
