"""The search's two pictures: the bytes/objective front and the bits per layer and linear."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pqflow.methods.bitsearch.space import Allocation, SearchSpace, layer_of
from pqflow.methods.bitsearch.trials import Trial


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(trials: list[Trial], front: list[Trial], best: Trial, budget: int, objective: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mib = 2**20
    kinds = sorted({t.source.split(":")[0].split("@")[0] for t in trials})
    for kind in kinds:
        pts = [t for t in trials if t.source.split(":")[0] == kind]
        ax.scatter([t.bytes / mib for t in pts], [t.objective for t in pts], s=18, alpha=0.7, label=kind)
    ax.plot([t.bytes / mib for t in front], [t.objective for t in front], "k-", lw=1, label="Pareto front")
    ax.scatter([best.bytes / mib], [best.objective], marker="*", s=160, c="red", label="chosen", zorder=5)
    ax.axvline(budget / mib, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("bytes of the quantized decoder linears (MiB)")
    ax.ticklabel_format(axis="x", useOffset=False)  # repaired trials sit within KiB of the budget
    ax.set_ylabel(objective + " on held-out tokens (lower is better)")
    ax.set_title("bit-search trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kind(module: str) -> str:
    """A linear's column: its path inside the block, expert indices written as ``*``."""
    local = module[len(layer_of(module)) + 1:]
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", local)


def bits_heatmap(space: SearchSpace, alloc: Allocation, layer_names: list[str], layer_scores: np.ndarray | None,
                 score_label: str, path: Path) -> None:
    """Bits per (layer, linear) with group sizes written in the cells, and the prior's layer
    scores beside it."""
    plt = _plt()
    per_module = space.module_choices(alloc)
    kinds = list(dict.fromkeys(_kind(m) for m in space.modules))
    grid = np.full((len(layer_names), len(kinds)), np.nan)
    text = [["" for _ in kinds] for _ in layer_names]
    cells: dict[tuple[int, int], list] = {}
    for m, c in per_module.items():
        cells.setdefault((layer_names.index(layer_of(m)), kinds.index(_kind(m))), []).append(c)
    for (li, ki), cs in cells.items():
        # MoE experts share a column: the mean of their bits, the label when they agree.
        grid[li, ki] = float(np.mean([c.bits for c in cs]))
        labels = {c.label for c in cs}
        text[li][ki] = labels.pop() if len(labels) == 1 else f"~{grid[li, ki]:.1f}"
    h = max(3.0, 0.22 * len(layer_names) + 1.2)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, h), gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=max(8, np.nanmax(grid)))
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layer_names)), [p.rsplit(".", 1)[1] for p in layer_names], fontsize=7)
    ax.set_ylabel("decoder layer")
    for i, row in enumerate(text):
        for j, s in enumerate(row):
            ax.text(j, i, s, ha="center", va="center", fontsize=5.5, color="white" if grid[i, j] < 6 else "black")
    fig.colorbar(im, ax=ax, label="bits", fraction=0.04)
    ax.set_title(f"allocation: {space.avg_bits(alloc):.3f} bits/weight incl. scales", fontsize=9)
    if layer_scores is not None:
        ax2.barh(range(len(layer_scores)), layer_scores, color="tab:orange")
    ax2.set_title(score_label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
