"""Where a stage computes: the recipe's ``device`` (auto | cpu | cuda[:n]) and ``dtype`` resolved
against what the machine has."""

from __future__ import annotations

import torch

from pqflow.errors import PqflowError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a CUDA device that is
    not there is one clear error (never a silent fall back to the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PqflowError(f"device '{name}': this machine has no CUDA device (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PqflowError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else DTYPES[name]


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory allocated on a CUDA device since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _to(x: object, dev: torch.device) -> object:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, tuple | list):
        return type(x)(_to(v, dev) for v in x)
    return x


def follow_inputs(module: torch.nn.Module) -> None:
    """Token ids and labels given to ``module`` go to the device of its weights first, so callers
    can keep their windows on the CPU (idempotent)."""
    if getattr(module, "_pqflow_follow_inputs", False):
        return

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        dev = model_device(mod)
        return _to(args, dev), {k: _to(v, dev) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)
    module._pqflow_follow_inputs = True


def place(model: torch.nn.Module, device: str = "auto", dtype: str | None = None) -> torch.device:
    """Move ``model`` to the stage's device (and compute dtype, when one is set) in place; returns
    the device. Buffers computed at construction (rotary inverse frequencies) keep their dtype.
    The model and its backbone take inputs from any device (:func:`follow_inputs`)."""
    from pqflow.architectures import backbone
    from pqflow.models import cast_float

    dev = resolve_device(device)
    if dtype is not None:
        cast_float(model, DTYPES[dtype])
    model.to(dev)
    follow_inputs(model)
    follow_inputs(backbone(model))
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter (the CPU for an empty model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
