"""Learning the scales of packed layers in place (and, optionally, their norm gains and codes).

Shared by ``mrem`` (one decoder block at a time, block-output MSE) and ``e2e`` (the whole model,
KL to the fp logits): each ``QuantLinear`` is swapped for a :class:`TunedLinear` while the loss is
minimised, then committed back into packed codes and stored-dtype scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import quantized_modules, set_module


class TunedLinear(nn.Module):
    """Stand-in for a QuantLinear while its scales (and codes) are learned: the weight is
    ``(q − z) · s₀ · exp(a)``, differentiable in ``a``; with ``learn_codes`` the centred code
    ``q − z`` is the rounded latent ``u`` (straight-through), clamped to the grid."""

    def __init__(self, q: QuantLinear, learn_codes: bool = False) -> None:
        super().__init__()
        self.q = q
        z = q.zero_points()[:, q.gidx]
        cz = q.codes().float() - z
        self.register_buffer("s0", q.scales.detach().float())
        self.log_a = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = None if q.bias is None else q.bias.detach().float()
        if learn_codes:
            self.u = nn.Parameter(cz)
            self.register_buffer("lo", -z)
            self.register_buffer("hi", (2**q.bits - 1) - z)
        else:
            self.u = None
            self.register_buffer("cz", cz)

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.log_a)

    def centred_codes(self) -> torch.Tensor:
        if self.u is None:
            return self.cz
        r = torch.minimum(torch.maximum(torch.round(self.u), self.lo), self.hi)
        return self.u + (r - self.u).detach()

    @torch.no_grad()
    def keep_near_grid(self) -> None:
        """A latent far outside the grid would need many steps to come back: hold it within
        half a level of the end codes."""
        if self.u is not None:
            self.u.copy_(torch.minimum(torch.maximum(self.u, self.lo - 0.5), self.hi + 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.centred_codes() * self.scales()[:, self.q.gidx]
        return nn.functional.linear(x, w, self.bias)

    def commit(self) -> QuantLinear:
        if self.u is None:
            self.q.scales.data = self.scales().detach().to(self.q.scales.dtype)
            return self.q
        z = self.q.zero_points()
        codes = (self.centred_codes().detach() + z[:, self.q.gidx]).round().to(torch.int64)
        self.q.set_quantized(codes, self.scales().detach(), z)
        return self.q


def norm_gains(module: nn.Module) -> list[nn.Parameter]:
    return [m.weight for n, m in module.named_modules() if "norm" in type(m).__name__.lower() and hasattr(m, "weight")]


def constant(_step: int) -> float:
    return 1.0


def cosine(steps: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


class ScaleTuner:
    """Adam on the log-scales of every ``QuantLinear`` under ``module`` (norm gains with
    ``norm_lr > 0``, latent codes with ``learn_codes``); everything else is frozen until
    :meth:`finish`. Scales and gains follow ``schedule``; code latents always decay linearly to
    0, so the last steps do not flip codes at random."""

    def __init__(self, module: nn.Module, steps: int, lr: float, norm_lr: float = 0.0, learn_codes: bool = False,
                 code_lr: float = 0.02, schedule: Callable[[int], float] = constant) -> None:
        self.module = module
        self.tuned = {n: TunedLinear(q, learn_codes) for n, q in quantized_modules(module).items()}
        if not self.tuned:
            raise ValueError("nothing to tune: no QuantLinear in the module")
        for n, t in self.tuned.items():
            set_module(module, n, t)
        norms = norm_gains(module) if norm_lr > 0 else []
        latents = [t.u for t in self.tuned.values() if t.u is not None]
        trainable = {id(t.log_a) for t in self.tuned.values()} | {id(p) for p in norms} | {id(u) for u in latents}
        self.was = {p: p.requires_grad for p in module.parameters()}
        for p in module.parameters():
            p.requires_grad_(id(p) in trainable)
        groups = [{"params": [t.log_a for t in self.tuned.values()], "lr": lr}]
        if norms:
            groups.append({"params": norms, "lr": norm_lr})
        decay = [schedule] * len(groups)
        if latents:
            groups.append({"params": latents, "lr": code_lr})
            decay.append(lambda step: 1.0 - step / max(steps, 1))
        self.opt = torch.optim.Adam(groups)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, decay)

    def step(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        for t in self.tuned.values():
            t.keep_near_grid()
        return float(loss.detach())

    def finish(self) -> None:
        """Commit codes and scales back into the packed layers and restore ``requires_grad``."""
        for n, t in self.tuned.items():
            set_module(self.module, n, t.commit())
        for p, r in self.was.items():
            p.requires_grad_(r)
