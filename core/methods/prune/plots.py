"""Plot of what a prune plan keeps per layer (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from pqflow.architectures import LayerGeometry


def plot_plan(plan_json: dict, geos: list[LayerGeometry], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = plan_json["layers"]
    x = list(range(len(layers)))
    heads = [r["heads"] / g.n_heads for r, g in zip(layers, geos, strict=True)]
    chans = [r["channels"] / g.inter for r, g in zip(layers, geos, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar([i - 0.2 for i in x], heads, width=0.4, label="query heads kept", color="tab:orange")
    ax.bar([i + 0.2 for i in x], chans, width=0.4, label="MLP channels kept", color="tab:green")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer (original index)")
    ax.set_ylabel("fraction kept")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
