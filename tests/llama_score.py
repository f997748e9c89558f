"""pqflow's perplexity protocol in llama.cpp, shared by the tests and ``bench/export.py``: each
window fed as token ids from an empty cache, the NLL of every next token from the logits of all
positions, exp of the mean of the windows' mean NLLs. Imports only numpy (and takes a
``llama_cpp.Llama`` made with ``logits_all=True``), so the bench's engine process never imports
pqflow or torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def llama_ppl(llm, windows: Sequence[Sequence[int]]) -> float:
    nlls = []
    for w in windows:
        w = list(w)
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)[:-1]
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nlls.append(float(np.mean(logz - logits[np.arange(len(w) - 1), w[1:]])))
    return math.exp(float(np.mean(nlls)))
