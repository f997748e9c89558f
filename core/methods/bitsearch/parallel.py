"""Measure several allocations at once in worker processes, each with its own model copy.

Workers are spawned (not forked: a forked copy of a process that already ran torch threads can
deadlock) and build their evaluator once from a picklable factory; the CPU threads are split
between them so that parallel workers do not oversubscribe the machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import torch

from pqflow.methods.bitsearch.evaluator import Evaluator, Measure
from pqflow.methods.bitsearch.space import Allocation

_EVALUATOR: Evaluator | None = None


def _init(factory: Callable[[], Evaluator], threads: int) -> None:
    global _EVALUATOR
    torch.set_num_threads(threads)
    _EVALUATOR = factory()


def _measure(alloc: Allocation) -> Measure:
    assert _EVALUATOR is not None
    return _EVALUATOR.measure(alloc)


class EvaluatorPool:
    def __init__(self, factory: Callable[[], Evaluator], workers: int) -> None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                                       initargs=(factory, threads))

    def map(self, allocs: Sequence[Allocation]) -> list[Measure]:
        return list(self._ex.map(_measure, allocs))

    def close(self) -> None:
        self._ex.shutdown(cancel_futures=True)
