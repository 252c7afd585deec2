"""`aha up` end to end: a shorter demo run through real NATS, vLLM and DeepSpeed processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_aha_up_learns_through_the_async_loop(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "deploy.cli", "up", "--json",
            "--name", "e2e", "--seed", "0",
            "--max-steps", "12", "--max-staleness", "2",
            "--config", str(_config(tmp_path)),
        ],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    # R1-Zero in miniature: reward alone lifts held-out greedy accuracy by a clear margin.
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.3, summary
    assert summary["length_after"] > summary["length_before"]  # it learned to think

    # Asynchronous: trained on rollouts of several policy versions, never beyond the bound.
    assert len(summary["policy_versions_trained_on"]) > 1
    assert 0 < summary["max_staleness_trained"] <= 2

    # No task lost: each is trained, dropped as stale or zero-variance, or still in a queue.
    assert summary["steps"] == 12
    assert summary["tasks_issued"] == (
        summary["groups_trained"]
        + summary["groups_dropped_stale"]
        + summary["groups_dropped_zero_variance"]
        + summary["groups_in_flight_at_stop"]
    ), summary
    assert summary["groups_trained"] == 12 * 16
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]

    # What a user looks at afterwards: the plot and a model `from_pretrained` loads.
    assert (run_dir / "curves.png").stat().st_size > 10_000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["final_model"])


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "up.toml"
    path.write_text("[up]\nruns_dir = \"runs\"\neval_problems = 300\neval_samples = 0\n")
    return path
