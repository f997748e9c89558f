"""Refine the prior itself with nevergrad: search a few knobs of its damage model, not the
allocation.

An allocation of ~200 linears over 8 choices is a large space for 40 measured trials. A
mutation search (``nevergrad``) moves a few dozen units away from its seed, and what those moves
win on a small held-out batch is partly specific to the trials' fake quantizer: with RTN trials
and a stronger quantizer in ``quantize`` (GPTQ, MREM), the importance prior it started from can
end up ahead. Here every candidate is itself a prior. Each one is the greedy fill, up to the
budget, of a re-weighted damage table::

    damage'[u, c] = w[layer(u)] ** alpha * exp(beta[kind(u)] + gamma * depth(u)) * err[u, c] ** eta

``w`` is the prior's layer weight, ``kind`` is the linear's own name (the last component of its
module name: one kind per projection of the attention and of the MLP),
``depth`` runs from -0.5 (first layer) to 0.5 (last), and ``err`` is the rounding-error table
of the trials' fake quantizer. The prior is the point alpha = eta = 1, beta = gamma = 0, and is
measured first. There are about ten dimensions, so a Gaussian-process Bayesian optimiser (BO,
the default) can be used. Every candidate uses the budget, so no repair is needed; two knob
vectors that give the same allocation cost one trial.
"""

from __future__ import annotations

import sys

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pqflow.errors import RecipeError
from pqflow.methods.bitsearch import budget as budget_ops
from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.importance_prior import SeedPrior
from pqflow.methods.bitsearch.nevergrad_search import _pool, _seed
from pqflow.methods.bitsearch.priors import damage_table, layer_index
from pqflow.methods.bitsearch.space import SearchSpace
from pqflow.methods.bitsearch.trials import Trial
from pqflow.recipe import MAX_NAME, MAX_TRIALS, MAX_WORKERS

SOURCE = "nevergrad-prior"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimizer: str = Field("BO", max_length=MAX_NAME, description="nevergrad optimizer over the knobs (any in ng.optimizers.registry; "
                           "BO = Gaussian-process Bayesian optimisation)")
    trials: int = Field(40, ge=1, le=MAX_TRIALS, description="measured allocations, the priors included (repeats do not count)")
    prior: SeedPrior = Field("auto", description="prior whose damage model is tuned (see importance-prior); "
                             "auto = measure every available prior and tune the best")
    probe: str | None = Field(None, max_length=32, description="choice used by sensitivity probes; null = the cheapest")
    kind_range: float = Field(2.0, gt=0, le=20, description="|beta| bound: a linear kind's damage scaled by up to e^this")
    depth_range: float = Field(2.0, ge=0, le=20, description="|gamma| bound: damage tilted from first to last layer by up to e^this")
    alpha_range: tuple[float, float] = Field((0.0, 2.0), description="exponent on the prior's layer weights")
    eta_range: tuple[float, float] = Field((0.5, 1.5), description="exponent on the rounding errors (how much worse "
                                           "fewer bits get)")
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="candidates measured in parallel (processes); 1 = in this process")
    max_asks_factor: int = Field(10, ge=1, le=1000, description="stop after trials * this many asks even if allocations repeat")


def kinds(space: SearchSpace) -> tuple[list[str], np.ndarray]:
    """The linear kinds present (last name component; the names joined by ``+`` for linears a
    target ties, e.g. the attention's fused inputs) and each unit's kind index; a decoder-layer
    unit (granularity ``layer``) has the single kind ``layer``."""
    names = ["layer" if space.granularity == "layer" else "+".join(m.rsplit(".", 1)[1] for m in mods)
             for mods in space.unit_modules]
    uniq = list(dict.fromkeys(names))
    return uniq, np.array([uniq.index(n) for n in names])


class Knobs:
    """Maps a knob vector ``[alpha, eta, gamma, beta_0 .. beta_k]`` to a damage table."""

    def __init__(self, space: SearchSpace, err_unit: np.ndarray, layer_w: np.ndarray) -> None:
        self.space, self.err, self.w = space, err_unit, np.asarray(layer_w, dtype=np.float64)
        self.kind_names, self.kind = kinds(space)
        _, layer = layer_index(space)
        self.depth = layer / max(int(layer.max()), 1) - 0.5
        self.prior_vector = np.array([1.0, 1.0, 0.0] + [0.0] * len(self.kind_names))

    def damage(self, x: np.ndarray) -> np.ndarray:
        alpha, eta, gamma, beta = float(x[0]), float(x[1]), float(x[2]), np.asarray(x[3:])
        base = damage_table(self.space, np.ones_like(self.err), self.w) ** alpha
        tilt = np.exp(beta[self.kind] + gamma * self.depth)[:, None]
        return base * tilt * np.power(np.maximum(self.err, 0.0), eta)

    def describe(self, x: np.ndarray) -> dict[str, float]:
        return {"alpha": float(x[0]), "eta": float(x[1]), "gamma": float(x[2]),
                **{f"beta_{k}": float(b) for k, b in zip(self.kind_names, x[3:], strict=True)}}


def _optimizer(params: Params, knobs: Knobs, budget: int, seed: int):
    import nevergrad as ng

    if params.optimizer not in ng.optimizers.registry:
        raise RecipeError(f"nevergrad-prior: optimizer '{params.optimizer}' not found; e.g. BO, CMA, TwoPointsDE, NGOpt")
    n_kinds = len(knobs.kind_names)
    lo = np.array([params.alpha_range[0], params.eta_range[0], -params.depth_range] + [-params.kind_range] * n_kinds)
    hi = np.array([params.alpha_range[1], params.eta_range[1], params.depth_range] + [params.kind_range] * n_kinds)
    if np.any(lo > knobs.prior_vector) or np.any(hi < knobs.prior_vector) or np.any(lo >= hi):
        raise RecipeError("nevergrad-prior: the knob ranges must contain the prior (alpha = eta = 1, 0 tilts)")
    param = ng.p.Array(init=knobs.prior_vector.copy(), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    return ng.optimizers.registry[params.optimizer](parametrization=param, budget=budget, num_workers=params.workers)


def search(ctx: SearchContext, params: Params) -> Trial:
    ctx.prior_settings.probe = params.probe
    start = len(ctx.trials)
    prior, prior_trial = _seed(ctx, params.prior)
    knobs = Knobs(ctx.space, ctx.err_unit, ctx.layer_weights(prior))
    ctx.info.update(prior=prior, optimizer=params.optimizer, prior_objective=prior_trial.objective,
                    knobs=knobs.describe(knobs.prior_vector))

    def measured() -> int:
        return sum(t.source.startswith("prior:") or t.source == SOURCE for t in ctx.trials.records[start:])

    max_asks = params.trials * params.max_asks_factor
    opt = _optimizer(params, knobs, max_asks, ctx.seed)
    opt.suggest(knobs.prior_vector.copy())
    best_x, best_obj, asks = knobs.prior_vector.copy(), prior_trial.objective, 0
    pool = _pool(ctx, params.workers)
    try:
        while measured() < params.trials and asks < max_asks:
            cands = [opt.ask() for _ in range(min(params.workers, params.trials - measured()))]
            asks += len(cands)
            xs = [np.asarray(c.value, dtype=np.float64) for c in cands]
            allocs = [budget_ops.greedy(ctx.space, ctx.budget, knobs.damage(x)) for x in xs]
            fresh = list(dict.fromkeys(a for a in allocs if a not in ctx.trials))
            if pool is not None and len(fresh) > 1:
                for a, m in zip(fresh, pool.map(fresh), strict=True):
                    ctx.trials.record(a, m, SOURCE)
            for c, x, a in zip(cands, xs, allocs, strict=True):
                t = ctx.evaluate(a, SOURCE)
                opt.tell(c, t.objective)
                if t.objective < best_obj:
                    best_x, best_obj = x, t.objective
    finally:
        if pool is not None:
            pool.close()
    best = ctx.trials.best(ctx.budget)
    ctx.info.update(asks=asks, cache_hits=ctx.trials.hits, improvement=prior_trial.objective - best.objective,
                    best_knobs=knobs.describe(best_x))
    if ctx.progress:
        print(f"[pqflow] bit-search: {SOURCE} ({params.optimizer}): {measured()} measured / {asks} asks; best "
              f"{best.objective:.5f} vs prior {prior_trial.objective:.5f}; knobs {knobs.describe(best_x)}",
              file=sys.stderr)
    return best
