"""Refine a prior allocation by black-box search with nevergrad under the byte budget.

The search variable is one integer per unit (an index into the bit choices, which are ordered by
bytes). Every candidate the optimizer asks for is repaired to the budget and filled up to it
(:mod:`.budget`, using the prior's damage table) before it is measured, and the optimizer is told
the measured objective of the repaired allocation. Repaired allocations are cached, so a
candidate that maps onto an allocation already measured costs nothing and does not count as a
trial. The first candidate is the prior itself.

With ``workers > 1`` the optimizer is asked for that many candidates at a time and they are
measured in a pool of processes, each holding its own copy of the model.
"""

from __future__ import annotations

import sys

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pqflow.methods.bitsearch import budget as budget_ops
from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.importance_prior import SeedPrior
from pqflow.methods.bitsearch.trials import Trial
from pqflow.recipe import MAX_NAME, MAX_TRIALS, MAX_WORKERS

# Model-based / Bayesian where the dimension allows it (BO: Gaussian process via bayes_opt);
# the discrete (1+1) family is the default: with ~40 evaluations in 30-200 dimensions it makes
# better use of a good starting point than a surrogate can.
OPTIMIZERS = ("DiscreteLenglerOnePlusOne", "PortfolioDiscreteOnePlusOne", "DiscreteOnePlusOne", "NGOpt",
              "TwoPointsDE", "BO", "CMA", "RecombiningPortfolioDiscreteOnePlusOne")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimizer: str = Field("DiscreteLenglerOnePlusOne", max_length=MAX_NAME, description=f"nevergrad optimizer, one of {', '.join(OPTIMIZERS)} (or any in ng.optimizers.registry)")
    trials: int = Field(40, ge=1, le=MAX_TRIALS, description="measured allocations, the prior included (cache hits do not count)")
    prior: SeedPrior = Field("auto", description="seed allocation and repair damage model (see importance-prior); "
                             "auto = measure every available prior's allocation and start from the best")
    probe: str | None = Field(None, max_length=32, description="choice used by sensitivity probes; null = the cheapest")
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="candidates measured in parallel (processes); 1 = in this process")
    max_asks_factor: int = Field(20, ge=1, le=1000, description="stop after trials * this many asks even if candidates keep repeating")
    front_fractions: list[float] = Field(default_factory=list, max_length=64, description="also measure the prior at these fractions of the budget (points for the Pareto front)")


def _optimizer(name: str, space_size: tuple[int, int], init: np.ndarray, budget: int, workers: int, seed: int):
    import nevergrad as ng

    if name not in ng.optimizers.registry:
        raise ValueError(f"nevergrad optimizer '{name}' not found; e.g. {', '.join(OPTIMIZERS)}")
    n_units, n_choices = space_size
    param = ng.p.Array(init=init.astype(float), lower=0, upper=n_choices - 1).set_integer_casting()
    param.random_state = np.random.RandomState(seed)
    return ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=workers)


def search(ctx: SearchContext, params: Params) -> Trial:
    space = ctx.space
    ctx.prior_settings.probe = params.probe
    start = len(ctx.trials)
    prior, prior_trial = _seed(ctx, params.prior)
    damage = ctx.damage(prior)
    seed_alloc = prior_trial.alloc
    for f in params.front_fractions:
        ctx.evaluate(ctx.prior_allocation(prior, int(ctx.budget * f)), f"prior:{prior}@{f:g}")
    ctx.info.update(prior=prior, optimizer=params.optimizer, prior_objective=prior_trial.objective)
    n_priors = sum(t.source.startswith("prior:") and "@" not in t.source for t in ctx.trials.records[start:])

    def measured() -> int:  # the priors plus what the optimizer got measured
        return n_priors + sum(t.source == "nevergrad" for t in ctx.trials.records[start:])

    max_asks = params.trials * params.max_asks_factor
    opt = _optimizer(params.optimizer, space.cost.shape, np.asarray(seed_alloc), max_asks, params.workers, ctx.seed)
    opt.suggest(np.asarray(seed_alloc, dtype=float))
    pool = _pool(ctx, params.workers) if space.cost.shape[1] > 1 else None
    asks = 0
    try:
        while space.cost.shape[1] > 1 and measured() < params.trials and asks < max_asks:
            cands = [opt.ask() for _ in range(min(params.workers, params.trials - measured()))]
            asks += len(cands)
            fixed = [budget_ops.fit(space, np.rint(c.value).astype(int), ctx.budget, damage) for c in cands]
            fresh = list(dict.fromkeys(a for a in fixed if a not in ctx.trials))
            if pool is not None and len(fresh) > 1:
                for a, m in zip(fresh, pool.map(fresh), strict=True):
                    ctx.trials.record(a, m, "nevergrad")
            for c, a in zip(cands, fixed, strict=True):
                opt.tell(c, ctx.evaluate(a, "nevergrad").objective)
    finally:
        if pool is not None:
            pool.close()
    best = ctx.trials.best(ctx.budget)
    ctx.info.update(asks=asks, cache_hits=ctx.trials.hits, improvement=prior_trial.objective - best.objective)
    if ctx.progress:
        print(f"[pqflow] bit-search: {params.optimizer}: {measured()} measured / {asks} asks; best "
              f"{best.objective:.5f} vs prior {prior_trial.objective:.5f}", file=sys.stderr)
    return best


def _seed(ctx: SearchContext, prior: str) -> tuple[str, Trial]:
    """The prior to start from and its measured allocation; ``auto`` measures each available
    prior's allocation and keeps the best (they all stay in the trials)."""
    if prior != "auto":
        return prior, ctx.evaluate(ctx.prior_allocation(prior), f"prior:{prior}")
    names = ["sensitivity", "mi", "error"] + (["importance"] if ctx.importance() is not None else [])
    if ctx.calib is None:
        names.remove("mi")
    measured = {p: ctx.evaluate(ctx.prior_allocation(p), f"prior:{p}") for p in names}
    best = min(names, key=lambda p: (measured[p].objective, names.index(p)))
    ctx.info["prior_objectives"] = {p: t.objective for p, t in measured.items()}
    return best, measured[best]


def _pool(ctx: SearchContext, workers: int):
    if workers <= 1:
        return None
    if ctx.worker_factory is None:
        print("[pqflow] bit-search: no worker factory; measuring candidates in this process", file=sys.stderr)
        return None
    from pqflow.methods.bitsearch.parallel import EvaluatorPool

    return EvaluatorPool(ctx.worker_factory, workers)
