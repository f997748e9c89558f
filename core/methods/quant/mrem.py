"""MREM: module-wise reconstruction error minimisation (Bai et al., 2021).

Each module (``blocks_per_module`` consecutive decoder blocks) is first quantized by GPTQ (or
RTN), then its quantization scales — and, optionally, the module's RMSNorm gains — are learned
with Adam so that the quantized module's output matches the full-precision module's output
``‖f_q(x) − f(x)‖²`` on calibration windows. Scales are learned in the log domain (a
multiplicative correction), so a step never flips a sign. With ``rounding: fixed`` the codes stay
those of the initialiser; with ``rounding: learned`` each code also gets a continuous latent value,
started at the initialiser's code and rounded in the forward with a straight-through gradient
(block-wise learned rounding, as in BRECQ/AutoRound), so a code moves to a neighbouring level when
that lowers the module's output error. Its learning rate decays linearly to 0 so the last steps
do not flip codes at random.

Two ways to feed a module:

- ``inputs: quantized`` (default): modules run in order; module ``i`` sees the outputs of the
  already-quantized modules ``< i`` and is trained towards the fp model's own hidden states, so
  it also absorbs the error of its predecessors.
- ``inputs: fp``: every module sees the fp model's hidden states. Modules are then independent
  and run in parallel, ``workers`` processes (``torch.multiprocessing``, spawn), each with
  ``cpu_count / workers`` threads; a worker receives the module's fp weights and cached
  inputs/targets through shared memory and returns the quantized module. ``anneal`` mixes in
  the quantized predecessor's output, ``x = (1-λ)·x_fp + λ·x_q`` with λ growing 0→1 over the
  steps (MREM's annealed teacher forcing), when modules run in order.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from pqflow.methods.quant import gptq as gptq_mod
from pqflow.methods.quant.blocks import (
    BlockInputs,
    block_linears,
    block_names,
    capture_inputs,
    decoder_layers,
    onloaded,
    run_block,
)
from pqflow.methods.quant.plan import Plan
from pqflow.methods.quant.scale_tuning import ScaleTuner
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import quantized_modules, set_module
from pqflow.recipe import MAX_BATCH, MAX_LAYERS, MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_WINDOWS, MAX_WORKERS

NEEDS_CALIBRATION = True
ONLOADS = True  # quantize() takes ``device`` and moves one module's blocks at a time there


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init: Literal["gptq", "rtn"] = Field("gptq", description="initial codes and scales")
    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="Adam steps per module; null = 60 when every linear of the "
                              "module has 4 bits or more, 150 below (3-bit scales need longer: SmolLM2 3g64 ppl "
                              "39.47 at 60 steps, 38.82 at 150)")
    lr: float = Field(2e-3, gt=0, description="learning rate of the log-scale corrections")
    norm_lr: float = Field(1e-3, ge=0, description="learning rate of the RMSNorm gains (0 = frozen)")
    rounding: Literal["fixed", "learned"] = Field("fixed", description="keep the initialiser's codes, or learn "
                                                  "them too (straight-through rounding)")
    code_lr: float = Field(0.02, gt=0, description="Adam learning rate of the latent codes (rounding: learned), "
                           "in code levels per step, decayed linearly to 0: a latent travels at most steps x lr / 2 "
                           "levels (1.5 at 150 steps; on SmolLM2's first 3 blocks at 3.0 bits 0.05 fits no "
                           "better and 0.005 flips no code)")
    batch_windows: int = Field(2, ge=1, le=MAX_BATCH, description="calibration windows per Adam step")
    n_windows: int | None = Field(None, ge=1, le=MAX_WINDOWS, description="calibration windows used; null = 32 with fixed codes, "
                                  "128 with learned rounding (a free code per weight over-fits 32: SmolLM2 at 3.0 "
                                  "bits, KL to fp16 0.12 on the calibration windows vs 0.54 on test; with 128, test "
                                  "ppl 44.73 -> 41.80)")
    blocks_per_module: int = Field(1, ge=1, le=MAX_LAYERS, description="consecutive decoder blocks optimised together")
    inputs: Literal["quantized", "fp"] = Field("quantized", description="what feeds each module (see module doc)")
    anneal: bool = Field(False, description="annealed teacher forcing from fp to quantized inputs (inputs: quantized)")
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="parallel processes (inputs: fp only)")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch threads per worker; null = CPU cores / workers")
    gptq: gptq_mod.Params = Field(default_factory=lambda: gptq_mod.Params(n_windows=None, batch_size=4),
                                  description="settings of the GPTQ initialiser")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the minibatch order")
    offload_hidden: bool = Field(False, description="keep the cached hidden states (fp inputs, fp targets, quantized "
                                 "inputs) in CPU memory and move each batch to the compute device")


def module_steps(params: Params, bits: list[int]) -> int:
    if params.steps is not None:
        return params.steps
    return 60 if min(bits, default=16) >= 4 else 150


def module_windows(params: Params) -> int:
    if params.n_windows is not None:
        return params.n_windows
    return 128 if params.rounding == "learned" else 32


def tune_module(module: nn.Module, x_in: torch.Tensor, y_fp: torch.Tensor, params: Params,
                x_fp: torch.Tensor | None = None, progress: bool = True,
                device: torch.device | None = None) -> dict[str, float]:
    """Learn the scales (norm gains, codes) of an already-quantized ``module`` (called as
    ``module(x)``) in place; returns the module's output MSE on all its calibration windows
    before and after. ``device``: where the module computes when the cached states lie elsewhere."""
    steps = module_steps(params, [q.bits for q in quantized_modules(module).values()])
    tuner = ScaleTuner(module, steps, params.lr, params.norm_lr, params.rounding == "learned", params.code_lr)
    g = torch.Generator().manual_seed(params.seed)
    before = _loss(module, x_in, y_fp, device)
    for step in tqdm(range(steps), desc="mrem steps", leave=False, disable=not progress):
        idx = torch.randperm(len(x_in), generator=g)[: params.batch_windows]
        x = _on(x_in[idx], device)
        if params.anneal and x_fp is not None:
            lam = min(1.0, 2 * step / max(steps, 1))  # fp inputs first, quantized ones from halfway
            x = (1 - lam) * _on(x_fp[idx], device) + lam * x
        out = module(x)
        tuner.step(((out[0] if isinstance(out, tuple) else out) - _on(y_fp[idx], device)).pow(2).mean())
    tuner.finish()
    after = _loss(module, x_in, y_fp, device)
    return {"mse_before": before, "mse_after": after}


def _on(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None else t.to(device)


@torch.no_grad()
def _loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | None = None, bs: int = 4) -> float:
    tot = 0.0
    for i in range(0, len(x), bs):
        out = module(_on(x[i : i + bs], device))
        tot += float(((out[0] if isinstance(out, tuple) else out) - _on(y[i : i + bs], device)).pow(2).sum())
    return tot / y.numel()


class _Module(nn.Module):
    """Consecutive decoder blocks run as one module, each with its own keyword arguments (mask,
    rotary embeddings: they differ between sliding and global layers)."""

    def __init__(self, blocks: list[nn.Module], kwargs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.block_kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b, kw in zip(self.blocks, self.block_kwargs, strict=True):
            y = b(x, **kw)
            x = y[0] if isinstance(y, tuple) else y
        return x


def _module_inputs(inputs: BlockInputs, hidden: torch.Tensor | None = None) -> BlockInputs:
    """Inputs for a :class:`_Module`: it holds its blocks' keyword arguments itself."""
    return replace(inputs, hidden=inputs.hidden if hidden is None else hidden, kwargs={})


def _quantize_init(module: _Module, prefixes: list[str], plan: Plan, inputs: BlockInputs, params: Params) -> None:
    """GPTQ (block by block, on the module's own inputs) or RTN codes and scales."""
    x = inputs
    for blk, kw, prefix in zip(module.blocks, module.block_kwargs, prefixes, strict=True):
        x = replace(x, kwargs=kw)
        if params.init == "gptq":
            gptq_mod.quantize_block(blk, prefix, plan, x, params.gptq)
        else:
            for name, lin in block_linears(blk, prefix).items():
                if name in plan:
                    sp = plan[name]
                    set_module(blk, name[len(prefix) + 1 :], QuantLinear.from_linear(lin, sp.bits, sp.group_size, sp.symmetric))
        if len(module.blocks) > 1:
            with torch.no_grad():
                x = x.with_hidden(run_block(blk, x))


def process_module(module: _Module, prefixes: list[str], plan: Plan, x_in: torch.Tensor, y_fp: torch.Tensor,
                   params: Params, x_fp: torch.Tensor | None = None, progress: bool = True,
                   device: torch.device | None = None) -> tuple[_Module, dict[str, float]]:
    """Initialise then tune one module; ``device``: where it computes when ``x_in``/``y_fp`` lie
    elsewhere (offloaded)."""
    _quantize_init(module, prefixes, plan, BlockInputs(x_in, {}, params.gptq.batch_size, device=device), params)
    stats = tune_module(module, x_in, y_fp, params, x_fp, progress, device)
    return module, stats


def _worker(args: tuple) -> tuple[int, _Module, dict[str, float]]:
    i, module, prefixes, plan, x_in, y_fp, params, threads = args
    torch.set_num_threads(threads)
    module, stats = process_module(module, prefixes, plan, x_in, y_fp, params, progress=False)
    return i, module, stats


@contextmanager
def _onloaded_all(blocks: list[nn.Module], device: torch.device | str | None) -> Iterator[None]:
    with ExitStack() as stack:
        for b in blocks:
            stack.enter_context(onloaded(b, device))
        yield


def quantize(model: nn.Module, windows: torch.Tensor | None, plan: Plan, params: Params,
             device: torch.device | str | None = None) -> nn.Module:
    """MREM module by module. ``device``: where each module computes; its blocks are moved there
    and back (block-wise onloading), so the model may stay in CPU memory. None: where it lies."""
    if windows is None:
        raise ValueError("mrem needs calibration windows (a 'calib' input)")
    if params.workers > 1 and params.inputs != "fp":
        raise ValueError("mrem: workers > 1 needs inputs: fp (modules fed by quantized predecessors run in order)")
    if params.workers > 1 and device is not None and torch.device(device).type != "cpu":
        raise ValueError("mrem: workers > 1 run on the CPU; use workers: 1 to compute on an accelerator")
    t0 = time.perf_counter()
    n = module_windows(params)
    if len(windows) < n and params.n_windows is None and params.rounding == "learned":
        print(f"[pqflow] mrem: learned rounding gets {len(windows)} calibration windows; it over-fits fewer "
              f"than {n} (calibrate.n_windows)", file=sys.stderr)
    windows = windows[:n]
    fp = capture_inputs(model, windows, params.gptq.batch_size, device, params.offload_hidden)
    layers = decoder_layers(model)
    names = block_names(model)
    k = params.blocks_per_module
    spans = [list(range(i, min(i + k, len(layers)))) for i in range(0, len(layers), k)]
    report: dict[str, float] = {}
    if params.inputs == "fp":
        _run_parallel(layers, names, spans, plan, fp, params, report, device)
    else:
        xq = fp.hidden.clone()
        for span in tqdm(spans, desc="mrem modules"):
            blocks = [layers[i] for i in span]
            with _onloaded_all(blocks, device):
                module = _Module(blocks, [fp.layer_kwargs[i] for i in span])
                with torch.no_grad():  # fp targets first, from the module's fp weights
                    y_fp = run_block(module, _module_inputs(fp))
                _, st = process_module(module, [names[i] for i in span], plan, xq, y_fp, params,
                                       x_fp=fp.hidden if params.anneal else None, device=fp.device)
                report.update({f"{names[span[0]]}.{k2}": v for k2, v in st.items()})
                with torch.no_grad():
                    xq = run_block(module, _module_inputs(fp, xq))
            fp.hidden = y_fp
    model.quant_errors = report
    print(f"[pqflow] mrem: {len(spans)} modules in {time.perf_counter() - t0:.0f}s "
          f"({params.inputs} inputs, {params.workers} worker(s))", file=sys.stderr)
    return model


def _run_parallel(layers: nn.ModuleList, names: list[str], spans: list[list[int]], plan: Plan, fp: BlockInputs,
                  params: Params, report: dict[str, float], device: torch.device | str | None) -> None:
    """Independent modules, each fed the fp model's hidden states. In process (one worker) each
    module's fp input and output are computed just before it is processed, so only two sets of
    hidden states exist at a time; with several workers every module's are cached, then fanned out."""
    threads = params.threads or max(1, (os.cpu_count() or 1) // params.workers)
    prev = torch.get_num_threads()
    x = fp.hidden
    if params.workers == 1:
        try:
            for span in tqdm(spans, desc="mrem modules"):
                blocks = [layers[i] for i in span]
                with _onloaded_all(blocks, device):
                    module = _Module(blocks, [fp.layer_kwargs[i] for i in span])
                    with torch.no_grad():
                        y = run_block(module, _module_inputs(fp, x))
                    torch.set_num_threads(threads)
                    _, stats = process_module(module, [names[i] for i in span], plan, x, y, params,
                                              progress=False, device=fp.device)
                    torch.set_num_threads(prev)
                report.update({f"{names[span[0]]}.{k}": v for k, v in stats.items()})
                x = y
        finally:
            torch.set_num_threads(prev)
        return
    jobs = []
    for j, span in enumerate(spans):
        module = _Module([layers[i] for i in span], [fp.layer_kwargs[i] for i in span])
        with torch.no_grad():
            y = run_block(module, _module_inputs(fp, x))
        jobs.append((j, copy.deepcopy(module), [names[i] for i in span], plan, x, y, params, threads))
        x = y
    ctx = torch.multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=params.workers, mp_context=ctx)
    try:
        for j, module, stats in tqdm(pool.map(_worker, jobs), total=len(jobs), desc="mrem modules"):
            for blk, i in zip(module.blocks, spans[j], strict=True):
                layers[i] = blk
            report.update({f"{names[spans[j][0]]}.{k}": v for k, v in stats.items()})
    finally:
        pool.shutdown()
        torch.set_num_threads(prev)
