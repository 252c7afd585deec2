"""The curves of a GRPO run, from the learner's step lines (`metrics.jsonl`)."""

from __future__ import annotations

from pathlib import Path

PANELS = [
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy (train samples)"),
    ("response_length", "response length (tokens)"),
    ("kl", "KL to reference (k3)"),
]
"""(step-line key, title) of each panel."""


def plot_curves(steps: list[dict], path: Path) -> Path | None:
    """Reward, accuracy, response length and KL over the steps, as a PNG; None without steps."""
    if not steps:
        return None
    import matplotlib  # here, not at the top: only a finished run draws, and it takes a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        ax.plot(x, [r.get(key, float("nan")) for r in steps], marker=".", linewidth=1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.suptitle("aha up: GRPO through the asynchronous loop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
