"""Per-linear input statistics from calibration windows, collected with forward hooks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from pqflow import architectures

WINDOWS_FILE = "windows.safetensors"
STATS_FILE = "stats.safetensors"


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (the output head and MoE routers excluded), by
    module name, in model order."""
    routers = architectures.router_modules(model)
    return {name: m for name, m in architectures.named_block_linears(model) if id(m) not in routers}


def input_group_of(model: nn.Module) -> dict[str, int]:
    """Linear name -> the index of the group of linears that read the same tensor (see
    :func:`pqflow.architectures.input_groups`); linears in no group get a group of their own."""
    group: dict[str, int] = {}
    gid = 0
    for block, layer in zip(architectures.block_names(model), architectures.decoder_layers(model), strict=True):
        for g in architectures.input_groups(layer):
            group.update({f"{block}.{path}": gid for path in g.linears})
            gid += 1
    return group


@torch.no_grad()
def collect_stats(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, xtx: bool = False,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Input statistics of every decoder linear.

    Returns ``(stats, aliases)``. ``stats[f"{name}.sqnorm"]`` is the per-input-channel sum of
    squares over all calibration tokens, ``stats[f"{name}.xtx"]`` (when asked) is ``XᵀX / n``.
    Linears that read the same tensor (the attention's q/k/v, the MLP's gate/up, one expert's
    gate/up) are computed once: ``aliases`` maps each such linear to the one whose statistics it
    shares. A linear that saw no token (an MoE expert the router never picked) gets zero
    statistics.
    """
    linears = decoder_linears(model)
    groups = input_group_of(model)
    sq: dict[str, torch.Tensor] = {}
    gram: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    # (group, address, shape) -> (first reader, the tensor). Holding the tensor keeps its address
    # from being reused by a later tensor of the same block; the dict is emptied at each block.
    owner_of_input: dict[tuple, tuple[str, torch.Tensor]] = {}
    n_tokens = 0

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            # Linears of one input group that read the very same tensor share statistics. An MoE
            # block's experts form one group but each reads only its own tokens: the address
            # tells them apart.
            key = (groups.get(name, name), x.data_ptr(), tuple(x.shape))
            owner = owner_of_input.get(key)
            if owner is not None and owner[0] != name:
                aliases[name] = owner[0]
                return
            owner_of_input[key] = (name, x)
            x = x.reshape(-1, x.shape[-1]).float()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            if xtx:
                g = x.T @ x
                gram[name] = gram[name].add_(g) if name in gram else g

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    handles += [layer.register_forward_pre_hook(lambda *_: owner_of_input.clear())
                for layer in architectures.decoder_layers(model)]
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress):
            batch = windows[i : i + batch_size]
            model(input_ids=batch, use_cache=False)
            n_tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        owner_of_input.clear()
    for name, lin in linears.items():
        if name not in sq and name not in aliases:  # never ran: no calibration token reached it
            w = lin.weight
            sq[name] = torch.zeros(lin.in_features, device=w.device)
            if xtx:
                gram[name] = torch.zeros(lin.in_features, lin.in_features, device=w.device)
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
