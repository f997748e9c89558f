"""Per-linear input statistics from calibration windows, collected with forward hooks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

WINDOWS_FILE = "windows.safetensors"
STATS_FILE = "stats.safetensors"


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (lm_head excluded), by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}"
    }


@torch.no_grad()
def collect_stats(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, xtx: bool = False,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Input statistics of every decoder linear.

    Returns ``(stats, aliases)``. ``stats[f"{name}.sqnorm"]`` is the per-input-channel sum of
    squares over all calibration tokens, ``stats[f"{name}.xtx"]`` (when asked) is ``XᵀX / n``.
    Linears that read the same tensor (q/k/v, gate/up) are computed once: ``aliases`` maps each
    such linear to the one whose statistics it shares.
    """
    linears = decoder_linears(model)
    sq: dict[str, torch.Tensor] = {}
    gram: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner_of_input: dict[tuple, str] = {}
    n_tokens = 0

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            # Siblings (same parent module, e.g. q/k/v in one attention) that read the very same
            # tensor share statistics; the parent keeps that tensor alive, so its address is unique.
            key = (name.rsplit(".", 1)[0], x.data_ptr(), tuple(x.shape))
            owner = owner_of_input.get(key)
            if owner is not None and owner != name:
                aliases[name] = owner
                return
            owner_of_input[key] = name
            x = x.reshape(-1, x.shape[-1]).float()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            if xtx:
                g = x.T @ x
                gram[name] = gram[name].add_(g) if name in gram else g

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress):
            batch = windows[i : i + batch_size]
            owner_of_input.clear()
            model(input_ids=batch, use_cache=False)
            n_tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    stats = {f"{n}.sqnorm": v.contiguous() for n, v in sq.items()}
    stats.update({f"{n}.xtx": (v / n_tokens).contiguous() for n, v in gram.items()})
    return stats, aliases


class Calibration:
    """A calibration artifact opened for reading."""

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder = Path(folder)
        self.meta = meta
        self.windows: torch.Tensor = load_file(self.folder / WINDOWS_FILE)["input_ids"]
        self._stats: dict[str, torch.Tensor] | None = None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        if self._stats is None:
            self._stats = load_file(self.folder / STATS_FILE)
        return self._stats

    def _owner(self, linear: str) -> str:
        return self.meta.get("aliases", {}).get(linear, linear)

    def act_norm(self, linear: str) -> torch.Tensor:
        """L2 norm of each input channel of ``linear`` over the calibration tokens."""
        return self.stats[f"{self._owner(linear)}.sqnorm"].sqrt()

    def xtx(self, linear: str) -> torch.Tensor | None:
        return self.stats.get(f"{self._owner(linear)}.xtx")
