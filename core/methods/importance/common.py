"""Scores shared by the importance methods, and the forward passes the activation-based methods
need. Where a block keeps its parts and its sizes come from :mod:`pqflow.architectures`; the names
``LayerGeometry``, ``layer_geometry``, ``geometries`` and ``decoder_layers`` are re-exported here
for the modules that import them from this one.

A score is "higher = more important". Every method fills ``layer`` (one score per decoder layer)
and, where it has a notion of them, the finer structures:

- ``head[l]``: one score per query head of layer ``l``;
- ``kv_group[l]``: one score per GQA group (a KV head together with the query heads reading it);
- ``channel[l]``: one score per MLP channel (a row of gate/up and a column of down). None for a
  model with MoE blocks: their channels belong to experts, and no method prunes those yet.

Lists, not stacked tensors, so an already pruned model with uneven layers can be scored too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pqflow import architectures as arch
from pqflow.architectures import LayerGeometry, decoder_layers, geometries
from pqflow.architectures import geometry as layer_geometry

__all__ = ["LayerGeometry", "Scores", "block_influence", "decoder_layers", "geometries", "has_dense_mlp",
           "layer_geometry", "non_embedding_params", "pick_windows"]

SCORES_FILE = "scores.safetensors"


def has_dense_mlp(layer: nn.Module) -> bool:
    """Whether the block's MLP is one gate/up/down (its channels can be scored), not MoE experts."""
    return "down" in arch.projections(layer)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embedding and the LM head (the pruning target's base)."""
    skip = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@dataclass
class Scores:
    method: str
    layer: torch.Tensor
    head: list[torch.Tensor] | None = None
    kv_group: list[torch.Tensor] | None = None
    channel: list[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Small per-layer vectors: kept on the CPU whichever device computed them.
        self.layer = self.layer.detach().float().cpu()
        for kind in ("head", "kv_group", "channel"):
            per = getattr(self, kind)
            if per is not None:
                setattr(self, kind, [t.detach().float().cpu() for t in per])

    def granularities(self) -> list[str]:
        return ["layer"] + [k for k in ("head", "kv_group", "channel") if getattr(self, k) is not None]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"layer": self.layer.float().contiguous()}
        for kind in ("head", "kv_group", "channel"):
            for i, t in enumerate(getattr(self, kind) or []):
                out[f"{kind}.{i}"] = t.float().contiguous()
        return out

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SCORES_FILE
        save_file(self.tensors(), path, metadata={"method": self.method})
        return path

    @classmethod
    def load(cls, folder: Path, method: str = "") -> Scores:
        t = load_file(Path(folder) / SCORES_FILE)
        n = t["layer"].numel()

        def seq(kind: str) -> list[torch.Tensor] | None:
            return [t[f"{kind}.{i}"] for i in range(n)] if f"{kind}.0" in t else None

        return cls(method, t["layer"], seq("head"), seq("kv_group"), seq("channel"))


# -- structure slices --------------------------------------------------------------------------


def head_rows(g: LayerGeometry, h: int) -> slice:
    return slice(h * g.head_dim, (h + 1) * g.head_dim)


def reduce_heads(q_rows: torch.Tensor, o_cols: torch.Tensor, g: LayerGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head sums: ``q_rows`` [n_heads*hd] values per q row, ``o_cols`` likewise per o column."""
    return q_rows.view(g.n_heads, g.head_dim).sum(1), o_cols.view(g.n_heads, g.head_dim).sum(1)


def kv_from_heads(head: torch.Tensor, kv_own: torch.Tensor, g: LayerGeometry,
                  agg: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A GQA group's score: its KV head's own score plus its query heads' scores."""
    per_group = head.view(g.n_kv, g.group)
    if agg is None:
        return per_group.sum(1) + kv_own
    return agg(torch.cat([per_group, kv_own[:, None]], dim=1))


# -- forward passes over calibration windows ----------------------------------------------------


def batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool = True) -> Iterator[torch.Tensor]:
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        yield windows[i : i + batch_size]


def pick_windows(windows: torch.Tensor, n: int | None) -> torch.Tensor:
    return windows if n is None or n >= len(windows) else windows[:n]


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_influence(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                    grams: bool = False, progress: bool = True) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """Per-layer ``1 - cos(input, output)`` averaged over tokens (ShortGPT's block influence,
    COMP's coarse metric) and, when ``grams``, each layer's ``XᵀX / n`` at the inputs of the
    attention's output projection (key ``"o"``) and of the MLP's down projection (``"down"``, absent
    for an MoE block): the activations whose columns width pruning removes."""
    layers = decoder_layers(model)
    bi = torch.zeros(len(layers), dtype=torch.float64)
    gram: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers))}
    n_tokens = 0
    handles = []

    def layer_hook(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = _hidden(out)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            bi[i] += (1 - cos).sum().double().cpu()  # per-layer scalars live on the CPU

        return fn

    def gram_hook(i: int, key: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            g = (x.T @ x).double()
            gram[i][key] = gram[i][key] + g if key in gram[i] else g

        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        if grams:
            handles.append(arch.o_input_hook(layer).register_forward_pre_hook(gram_hook(i, "o")))
            if has_dense_mlp(layer):
                handles.append(arch.down_input_hook(layer).register_forward_pre_hook(gram_hook(i, "down")))
    try:
        for b in batches(windows, batch_size, "block influence", progress):
            arch.backbone(model)(input_ids=b, use_cache=False)
            n_tokens += b.numel()
    finally:
        for h in handles:
            h.remove()
    grams_out = {i: {k: (v / n_tokens) for k, v in d.items()} for i, d in gram.items()}
    return (bi / n_tokens).float(), grams_out
