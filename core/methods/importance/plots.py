"""Plot of per-layer importance (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from pqflow.methods.importance.common import Scores


def plot_scores(scores: Scores, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + sum(getattr(scores, k) is not None for k in ("head", "channel"))
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.4 * rows), sharex=True, squeeze=False)
    n = scores.layer.numel()
    ax = axes[0][0]
    ax.bar(range(n), scores.layer.tolist(), color="tab:blue")
    ax.set_ylabel("layer score")
    ax.set_title(f"importance: {scores.method}")
    r = 1
    for kind, color in (("head", "tab:orange"), ("channel", "tab:green")):
        per = getattr(scores, kind)
        if per is None:
            continue
        ax = axes[r][0]
        ax.boxplot([t.float().numpy() for t in per], positions=list(range(n)), widths=0.6, showfliers=False,
                   patch_artist=True, boxprops={"facecolor": color, "alpha": 0.5})
        ax.set_yscale("log")
        ax.set_ylabel(f"{kind} scores")
        r += 1
    axes[-1][0].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
