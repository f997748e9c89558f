"""What a bit-search method works with: the space, the budget, the objective and the priors.

Everything expensive (the held-out forward, rounding errors, hidden states for the mutual
information, sensitivity probes) is computed on first use and kept, so methods and the bench can
ask for several priors without paying twice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pqflow.calibration import Calibration
from pqflow.methods.bitsearch import budget as budget_ops
from pqflow.methods.bitsearch.evaluator import Evaluator, WeightFn, rtn_weight
from pqflow.methods.bitsearch.priors import (
    damage_table,
    layer_index,
    mutual_information,
    prior_weights,
    relative_errors,
    sensitivity,
    unit_errors,
)
from pqflow.methods.bitsearch.space import Allocation, Choice, SearchSpace
from pqflow.methods.bitsearch.trials import Trial, Trials


@dataclass
class PriorSettings:
    probe: str | None = None  # choice label for sensitivity probes; None = the cheapest choice
    mi_windows: int = 16
    mi_clusters: int = 64
    mi_buckets: int = 64


@dataclass
class SearchContext:
    model: nn.Module
    space: SearchSpace
    budget: int
    heldout: torch.Tensor  # [n, seqlen] tokens of the held-out split
    calib: Calibration | None = None
    importance: Callable[[], np.ndarray | None] = lambda: None
    objective: str = "kl"
    weight_fn: WeightFn = rtn_weight
    seed: int = 0
    progress: bool = True
    cache_mb: int = 2000
    prior_settings: PriorSettings = field(default_factory=PriorSettings)
    worker_factory: Callable[[], Evaluator] | None = None  # picklable; builds an evaluator in a worker process
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _evaluator: Evaluator | None = None
    _trials: Trials | None = None
    _err_unit: np.ndarray | None = None
    _weights: dict[str, np.ndarray] = field(default_factory=dict)
    _mi: np.ndarray | None = None
    _sens: np.ndarray | None = None

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0
        return out

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = self._timed("evaluator_setup", lambda: Evaluator(
                self.model, self.space, self.heldout, self.objective, self.weight_fn, self.cache_mb))
        return self._evaluator

    @property
    def trials(self) -> Trials:
        if self._trials is None:
            self._trials = Trials(self.space, self.evaluator.measure)
        return self._trials

    def evaluate(self, alloc: Allocation, source: str) -> Trial:
        n = len(self.trials)
        t = self._timed("evaluations", lambda: self.trials.evaluate(alloc, source))
        if len(self.trials) > n and self.progress:
            print(f"[pqflow] bit-search: trial {t.index} ({source}) {t.avg_bits:.3f} bits "
                  f"{self.objective}={t.objective:.5f} ppl={np.exp(t.nll):.2f} [{t.seconds:.1f}s]", file=sys.stderr)
        return t

    @property
    def err_unit(self) -> np.ndarray:
        if self._err_unit is None:
            errs = self._timed("rounding_errors", lambda: relative_errors(
                self.space, self.evaluator.cache, self.calib, progress=self.progress))
            self._err_unit = unit_errors(self.space, errs)
        return self._err_unit

    def probe_index(self) -> int:
        label = self.prior_settings.probe
        if label is None:
            return 0
        labels = [c.label for c in self.space.choices]
        if label not in labels:
            raise ValueError(f"probe choice '{label}' is not among the bit choices {labels}")
        return labels.index(label)

    def _mutual_information(self) -> np.ndarray:
        if self._mi is None:
            if self.calib is None:
                raise ValueError("prior 'mi' needs calibration windows")
            ps = self.prior_settings
            win = self.calib.windows[: ps.mi_windows]
            self._mi = self._timed("prior_mi", lambda: mutual_information(
                self.model, win, ps.mi_clusters, ps.mi_buckets, seed=self.seed, progress=self.progress))
        return self._mi

    def _sensitivity(self) -> np.ndarray:
        if self._sens is None:
            probe: Choice = self.space.choices[self.probe_index()]
            self._sens = self._timed("prior_sensitivity", lambda: sensitivity(
                self.evaluator, probe, self.progress))[0]
        return self._sens

    def layer_weights(self, prior: str) -> np.ndarray:
        if prior not in self._weights:
            self._weights[prior] = prior_weights(
                prior, self.space, self.err_unit, mi=self._mutual_information, importance=self.importance,
                sens=self._sensitivity, probe=self.probe_index())
        return self._weights[prior]

    def damage(self, prior: str) -> np.ndarray:
        return damage_table(self.space, self.err_unit, self.layer_weights(prior))

    def prior_allocation(self, prior: str, budget: int | None = None) -> Allocation:
        """QPruner's starting point: more bits where the prior says damage is dearest, filled
        greedily up to the budget."""
        return budget_ops.greedy(self.space, self.budget if budget is None else budget, self.damage(prior))

    def layer_names(self) -> list[str]:
        return layer_index(self.space)[0]
