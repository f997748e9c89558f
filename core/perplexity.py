"""Perplexity with the GPTQ / LLM-Pruner protocol: non-overlapping windows scored independently."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PplResult:
    ppl: float
    nll: float
    windows: int
    tokens: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window, shape ``[n_windows]``."""
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        logits = model(input_ids=windows[i : i + batch_size], use_cache=False).logits[:, :-1].float()
        batch = windows[i : i + batch_size].to(logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.mean(dim=1).cpu())
    return torch.cat(out)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> PplResult:
    """exp(mean NLL over all windows); every window has the same length, so this is the
    token-weighted mean as in GPTQ's evaluation."""
    t0 = time.perf_counter()
    nlls = window_nlls(model, windows, batch_size, progress)
    secs = time.perf_counter() - t0
    nll = float(nlls.mean())
    return PplResult(math.exp(nll), nll, len(windows), windows.numel(), secs, windows.numel() / secs)
