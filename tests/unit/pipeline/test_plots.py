"""The run's curves: the `[learner.eval]` lines become a held-out pass@1 panel by version."""

from __future__ import annotations

import struct

from pipeline.plots import eval_series, plot_curves


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


STEPS = [
    {"event": "step", "step": s, "reward": 0.1 * s, "accuracy": 0.1 * s, "kl": 0.01}
    for s in (1, 2, 3)
]


def test_eval_lines_become_one_series_per_benchmark_in_version_order():
    rows = [
        *STEPS,
        {"event": "eval", "step": 2, "version": 2, "bench": "gsm8k", "pass_at_1": 0.5},
        {
            "event": "eval",
            "step": 1,
            "version": 1,
            "bench": "gsm8k",
            "pass_at_1": 0.25,
            "pass_at_1_stderr": 0.05,
        },
        {"event": "eval", "step": 1, "version": 1, "bench": "aime24", "pass_at_1": 0.0},
        # a resumed learner evaluated version 2 again: its latest line counts
        {"event": "eval", "step": 2, "version": 2, "bench": "gsm8k", "pass_at_1": 0.75},
        {"event": "eval", "step": 3, "version": 3, "bench": "gsm8k", "pass_at_1": None},
    ]
    assert eval_series(rows) == {
        "aime24": [(1, 0.0, 0.0)],
        "gsm8k": [(1, 0.25, 0.05), (2, 0.75, 0.0)],
    }


def test_a_run_with_evals_draws_a_third_column(tmp_path):
    plain = plot_curves(STEPS, tmp_path / "plain.png")
    evals = [{"event": "eval", "step": 2, "version": 2, "bench": "gsm8k", "pass_at_1": 0.5}]
    with_eval = plot_curves(STEPS, tmp_path / "eval.png", [*STEPS, *evals])
    assert png_size(plain) == (1000, 700)
    assert png_size(with_eval) == (1500, 700)
    assert plot_curves([], tmp_path / "none.png", evals) is None
