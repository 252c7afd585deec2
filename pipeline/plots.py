"""The curves of a GRPO run, from the learner's step lines (`metrics.jsonl`), with the
`[learner.eval]` results (its `eval` lines) in a panel of their own when there are any."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

PANELS = [
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy (train samples)"),
    ("response_length", "response length (tokens)"),
    ("kl", "KL to reference (k3)"),
]
"""(step-line key, title) of each panel."""


def eval_series(evals: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Benchmark -> [(policy version, pass@1, its standard error)] in version order, from
    the learner's `eval` lines (a resumed learner's repeat of a version: the latest counts)."""
    by_bench: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for row in evals:
        if row.get("event") == "eval" and row.get("pass_at_1") is not None:
            stderr = row.get("pass_at_1_stderr") or 0.0
            by_bench[row["bench"]][row["version"]] = (row["pass_at_1"], stderr)
    return {
        bench: [(v, p, e) for v, (p, e) in sorted(points.items())]
        for bench, points in sorted(by_bench.items())
    }


def plot_curves(steps: list[dict], path: Path, evals: list[dict] = ()) -> Path | None:
    """Reward, accuracy, response length and KL over the steps, and held-out pass@1 at each
    evaluated policy version (version v is the policy after step v), as a PNG; None without
    steps."""
    if not steps:
        return None
    import matplotlib  # here, not at the top: only a finished run draws, and it takes a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = eval_series(list(evals))
    columns = 3 if series else 2
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 7), sharex=True, squeeze=False)
    x = [r["step"] for r in steps]
    for ax, (key, title) in zip(axes[:, :2].flat, PANELS, strict=True):
        ax.plot(x, [r.get(key, float("nan")) for r in steps], marker=".", linewidth=1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if series:
        ax = axes[0, 2]
        for bench, points in series.items():
            versions, values, errors = zip(*points, strict=True)
            ax.errorbar(versions, values, yerr=errors, marker="o", capsize=3, label=bench)
        ax.set_title("held-out pass@1 ([learner.eval])")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        axes[1, 2].axis("off")
    for ax in axes[1]:
        ax.set_xlabel("GRPO step (policy version)")
    fig.suptitle("aha up: GRPO through the asynchronous loop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
