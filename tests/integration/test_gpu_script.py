"""benchmarks/gpu.sh, the GPU check, run here on CPU at its smallest so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def figures(path: Path) -> dict[str, dict]:
    return {f["figure"]: f for f in map(json.loads, path.read_text().splitlines())}


def test_gpu_script_runs_on_cpu_and_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu", "--tiny", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "tests/gpu" in run.stdout and "done in" in run.stdout
    learner = figures(tmp_path / "learner.jsonl")
    actor = figures(tmp_path / "actor.jsonl")
    weights = figures(tmp_path / "weights.jsonl")
    measured = [
        learner["learner_tokens"],
        learner["learner_publish"],
        learner["learner_publish_upload"],  # the store copy after the manifest, on its own
        actor["actor_tokens"],
        weights["weight_transfer"],
        weights["weight_publish"],
    ]
    for f in measured:
        assert len(f["runs"]) >= 3 and f["min"] > 0, f["figure"]
        assert f["min"] <= f["value"] <= f["max"], f["figure"]
    # Each figure stands next to its same-run baseline: the engine alone, a raw file copy.
    for f in (actor["actor_tokens"], weights["weight_transfer"], learner["learner_publish"]):
        assert len(f["baseline_runs"]) == len(f["runs"]) and f["ratio"] > 0, f["figure"]
    assert learner["learner_tokens"]["precision"] == "fp32"
    # The learner sends at most `fanout` (2) copies of a version to 3 actors.
    assert weights["weight_fanout_bytes"]["max"] <= 2.01
