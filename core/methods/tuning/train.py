"""The training loop shared by every fine-tuning method: causal-LM loss on random token windows
of the train split, gradient accumulation, a step budget (and optional wall-clock budget), a
cosine schedule with linear warm-up, validation perplexity on held-out windows every N steps, the
best trainable state kept and restored at the end."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from pqflow.perplexity import window_nlls
from pqflow.recipe import MAX_BATCH, MAX_SEED, MAX_SEQLEN, MAX_STEPS, MAX_THREADS, MAX_WINDOWS, check_tokens
from pqflow.runtime import peak_rss_mb


class TrainParams(BaseModel):
    """Settings every fine-tuning method shares (its recipe ``params`` extend these)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=1, le=MAX_STEPS, description="optimizer steps (the step budget)")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="windows per micro-batch")
    grad_accum: int = Field(1, ge=1, le=MAX_WINDOWS, description="micro-batches per optimizer step")
    seqlen: int = Field(256, ge=8, le=MAX_SEQLEN, description="tokens per training window")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to this fraction of lr")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = none")
    eval_every: int = Field(50, ge=1, le=MAX_STEPS, description="steps between validation perplexities")
    eval_windows: int = Field(16, ge=1, le=MAX_WINDOWS, description="held-out windows (of seqlen tokens) for validation")
    keep_best: bool = Field(True, description="restore the trainable state with the lowest validation ppl")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, ~30% slower)")
    max_minutes: float | None = Field(None, gt=0, le=1e6, description="wall-clock budget: training stops when it is spent, "
                                      "and the cosine schedule follows whichever budget runs out first")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch CPU threads while training; null = torch's default")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds adapter init, window order and dropout")
    device: str = Field("auto", max_length=32, description="auto (cuda when available) | cpu | cuda[:n]")

    @model_validator(mode="after")
    def _token_budget(self) -> TrainParams:
        check_tokens(self.batch_size, self.seqlen, "batch_size x seqlen")
        check_tokens(self.eval_windows, self.seqlen, "eval_windows x seqlen")
        return self


@dataclass
class TrainData:
    train_ids: torch.Tensor  # 1-D token stream of the train split
    heldout: torch.Tensor  # [n, seqlen] validation windows


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr
    evals: list[dict[str, float]] = field(default_factory=list)  # step, ppl
    best_step: int = 0
    best_ppl: float = math.inf
    initial_ppl: float = math.inf
    seconds: float = 0.0
    tokens: int = 0
    steps_done: int = 0
    stopped: str = "steps"
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def final_loss(self) -> float:
        tail = [s["loss"] for s in self.steps[-10:]]
        return sum(tail) / len(tail) if tail else math.nan


def resolve_device(name: str) -> torch.device:
    from pqflow.devices import resolve_device as resolve

    return resolve(name)


class WindowSampler:
    """Random windows without replacement: each epoch cuts the stream into non-overlapping
    windows at a random offset and visits them in a random order."""

    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int) -> None:
        if ids.numel() < 2 * seqlen:
            raise ValueError(f"train text has {ids.numel()} tokens, too few for windows of {seqlen}")
        self.ids, self.seqlen = ids, seqlen
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def _new_epoch(self) -> None:
        offset = int(torch.randint(0, self.seqlen, (1,), generator=self.g))
        n = (self.ids.numel() - offset) // self.seqlen
        self.order = (offset + torch.randperm(n, generator=self.g) * self.seqlen).tolist()

    def batch(self, size: int) -> torch.Tensor:
        rows = []
        for _ in range(size):
            if not self.order:
                self._new_epoch()
            s = self.order.pop()
            rows.append(self.ids[s : s + self.seqlen])
        return torch.stack(rows)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, time_frac: float = 0.0) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total`` steps, or earlier when
    ``time_frac`` (the spent fraction of a wall-clock budget) runs ahead of the step count, so a
    time-capped run still ends with a decayed learning rate."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_frac)
    progress = min(1.0, progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def validation_ppl(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    nll = float(window_nlls(model, windows, batch_size, progress=False).mean())
    model.train(was_training)
    return math.exp(nll)


def train(model: nn.Module, trainable: dict[str, nn.Parameter], data: TrainData, p: TrainParams,
          desc: str = "finetune") -> History:
    """Train ``trainable`` (everything else must already be frozen) in place. With ``keep_best``
    the parameters end at the state with the lowest validation perplexity (step 0 included, so
    tuning never leaves the model worse on held-out text than it started)."""
    if not trainable:
        raise ValueError("nothing to train: no trainable parameters")
    torch.manual_seed(p.seed)
    device = next(iter(trainable.values())).device
    heldout = data.heldout[: p.eval_windows].to(device)
    sampler = WindowSampler(data.train_ids, p.seqlen, p.seed)
    params = list(trainable.values())
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.999))
    budget_s = 60 * p.max_minutes if p.max_minutes is not None else math.inf
    threads = torch.get_num_threads()
    if p.threads is not None:
        torch.set_num_threads(p.threads)
    if p.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    hist = History()
    hist.initial_ppl = hist.best_ppl = validation_ppl(model, heldout, p.batch_size)
    hist.evals.append({"step": 0, "ppl": hist.initial_ppl})
    best = _snapshot(trainable) if p.keep_best else None
    print(f"[pqflow] {desc}: {sum(t.numel() for t in params):,} trainable params; "
          f"validation ppl {hist.initial_ppl:.3f} before training", file=sys.stderr)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(p.steps), desc=desc, file=sys.stderr, mininterval=5)
    for step in bar:
        elapsed = time.perf_counter() - t0
        lr = p.lr * lr_factor(step, p.steps, p.warmup_steps, p.min_lr_ratio, elapsed / budget_s)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(p.grad_accum):
            batch = sampler.batch(p.batch_size).to(device)
            loss = causal_lm_loss(model, batch) / p.grad_accum
            loss.backward()
            total += float(loss.detach())
            hist.tokens += batch.numel()
        if p.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
        opt.step()
        hist.steps.append({"step": step + 1, "loss": total, "lr": lr})
        hist.steps_done = step + 1
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}", refresh=False)
        last = step + 1 == p.steps
        out_of_time = time.perf_counter() - t0 > budget_s
        if (step + 1) % p.eval_every == 0 or last or out_of_time:
            ppl = validation_ppl(model, heldout, p.batch_size)
            hist.evals.append({"step": step + 1, "ppl": ppl})
            if ppl < hist.best_ppl:
                hist.best_ppl, hist.best_step = ppl, step + 1
                if best is not None:
                    best = _snapshot(trainable)
            print(f"[pqflow] {desc}: step {step + 1}: train loss {total:.4f}, validation ppl {ppl:.3f} "
                  f"(best {hist.best_ppl:.3f} @ {hist.best_step})", file=sys.stderr)
        if out_of_time and not last:
            hist.stopped = "time"
            break
    bar.close()
    hist.seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    model.eval()
    if p.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    if best is not None:
        _restore(trainable, best)
    hist.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        hist.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return hist


def _snapshot(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainable.items()}


@torch.no_grad()
def _restore(trainable: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for n, t in trainable.items():
        t.copy_(state[n])
