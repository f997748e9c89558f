"""The loss curve of a fine-tuning run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from pqflow.methods.tuning.train import History


def plot_history(hist: History, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps = [s["step"] for s in hist.steps]
    loss = [s["loss"] for s in hist.steps]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=0.8, label="train loss")
    if loss:
        # An exponential moving average shows the trend through the per-batch noise.
        ema, smooth = loss[0], []
        for v in loss:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train loss (EMA)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot([e["step"] for e in hist.evals], [e["ppl"] for e in hist.evals], "o-", color="tab:red",
             ms=3, label="validation ppl")
    if hist.best_step:
        ax2.axvline(hist.best_step, color="tab:red", ls=":", lw=1)
    ax2.set_ylabel("validation perplexity")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
