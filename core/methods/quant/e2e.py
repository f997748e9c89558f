"""E2E: end-to-end distillation of the quantization scales after a block-wise initialiser.

An initialiser (RTN, GPTQ or MREM) chooses every code; then all log-scale corrections of every
quantized linear, and the RMSNorm gains, are learned together with Adam so that the quantized
model's next-token distribution matches the full-precision model's: the loss is the KL divergence
``KL(p_fp ‖ p_q)`` per token on the calibration windows (the fp model is the teacher, computed on
the fly). This is the second phase of EfficientQAT (E2E-QP: train only the quantization
parameters end to end) with a distillation loss as in PEQA-style scale tuning; block-wise methods
only see each block's output error, this one sees what the errors of all blocks do to the
logits together. Zero points never change and, with ``rounding: fixed``, neither do the codes;
with ``rounding: learned`` every code may move to a neighbouring level (the straight-through
latents of mrem's learned rounding, here trained on the model's KL). Either way the bytes are
exactly the initialiser's. Calibration text only: the teacher never sees the test split either.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from pqflow.methods.quant import gptq as gptq_mod
from pqflow.methods.quant import mrem as mrem_mod
from pqflow.methods.quant import rtn as rtn_mod
from pqflow.methods.quant.plan import Plan
from pqflow.methods.quant.scale_tuning import ScaleTuner, cosine
from pqflow.quant.linear import QuantLinear
from pqflow.recipe import MAX_BATCH, MAX_SEED, MAX_STEPS, MAX_WINDOWS

NEEDS_CALIBRATION = True

INITS = {"rtn": rtn_mod, "gptq": gptq_mod, "mrem": mrem_mod}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init: Literal["rtn", "gptq", "mrem"] = Field("mrem", description="block-wise method that picks the codes")
    rtn: rtn_mod.Params = Field(default_factory=rtn_mod.Params, description="settings of the rtn initialiser")
    gptq: gptq_mod.Params = Field(default_factory=gptq_mod.Params, description="settings of the gptq initialiser")
    mrem: mrem_mod.Params = Field(default_factory=mrem_mod.Params, description="settings of the mrem initialiser")
    steps: int = Field(100, ge=0, le=MAX_STEPS, description="Adam steps over the whole model (SmolLM2, 2 x 512 tokens a step: "
                       "~6 s each on 2 CPU cores; 3.0-bit GPTQ ppl 65.2 -> 42.4 in 100 steps)")
    lr: float = Field(0.02, gt=0, description="peak learning rate of the log-scale corrections (cosine to 0)")
    rounding: Literal["fixed", "learned"] = Field("fixed", description="keep the initialiser's codes, or learn them "
                                                  "end to end too (straight-through latents, as mrem's)")
    code_lr: float = Field(0.02, gt=0, description="Adam learning rate of the latent codes (rounding: learned), "
                           "in code levels per step, decayed linearly to 0")
    norm_lr: float = Field(1e-3, ge=0, description="peak learning rate of the RMSNorm gains (0 = frozen)")
    batch_windows: int = Field(2, ge=1, le=MAX_BATCH, description="calibration windows per Adam step")
    n_windows: int | None = Field(None, ge=1, le=MAX_WINDOWS, description="calibration windows the distillation draws from "
                                  "(null = all the calib input has)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the minibatch order")


def token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher ‖ student)``, in float32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s, teacher_logp, log_target=True, reduction="none").sum(-1).mean()


def distill(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, params: Params,
           progress: bool = True) -> dict[str, float]:
    """Learn the scales of every ``QuantLinear`` of ``model`` (its norm gains, its codes) in place towards
    ``teacher``'s logits; returns the KL on the first windows before and after, and the seconds."""
    t0 = time.perf_counter()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tuner = ScaleTuner(model, params.steps, params.lr, params.norm_lr, params.rounding == "learned",
                       params.code_lr, cosine(params.steps))
    g = torch.Generator().manual_seed(params.seed)
    probe = windows[: params.batch_windows]
    before = _kl(model, teacher, probe)
    model.train(False)
    losses: list[float] = []
    bar = tqdm(range(params.steps), desc="e2e steps", disable=not progress, mininterval=5)
    for _ in bar:
        x = windows[torch.randperm(len(windows), generator=g)[: params.batch_windows]]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), dim=-1)
        losses.append(tuner.step(token_kl(model(input_ids=x, use_cache=False).logits, target)))
        bar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", refresh=False)
    tuner.finish()
    head, tail = losses[:10], losses[-10:]
    return {"kl_before": before, "kl_after": _kl(model, teacher, probe), "e2e_seconds": time.perf_counter() - t0,
            "train_kl_first10": sum(head) / max(len(head), 1), "train_kl_last10": sum(tail) / max(len(tail), 1)}


@torch.no_grad()
def _kl(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    target = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), dim=-1)
    return float(token_kl(model(input_ids=x, use_cache=False).logits, target))


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params) -> nn.Module:
    if windows is None:
        raise ValueError("e2e needs calibration windows (a 'calib' input)")
    teacher = copy.deepcopy(model).eval()  # the fp model, before the initialiser rewrites it in place
    init = INITS[params.init]
    model = init.quantize(model, windows, plan, getattr(params, params.init))
    errors = dict(getattr(model, "quant_errors", {}))
    if not all(isinstance(model.get_submodule(n), QuantLinear) for n in plan):
        raise ValueError(f"e2e: init '{params.init}' did not leave packed QuantLinear layers")
    stats = distill(model, teacher, windows[: params.n_windows], params)
    del teacher
    errors.update(stats)
    model.quant_errors = errors
    print(f"[pqflow] e2e: {params.steps} steps in {stats['e2e_seconds']:.0f}s; KL to fp on "
          f"{params.batch_windows} calibration windows {stats['kl_before']:.4f} -> {stats['kl_after']:.4f}",
          file=sys.stderr)
    return model
