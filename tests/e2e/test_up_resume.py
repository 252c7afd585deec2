"""`aha up` killed midway and resumed: no second cold start, the learner on from its
checkpoint, the queues from the run's NATS store, trained on to `max_steps`. Smallest budget
that shows it: a 2-step cold start, one held-out problem, 4 GRPO steps on the HF engine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import processes_with

pytestmark = pytest.mark.slow

STEPS = 4
CONFIG = """\
[up]
runs_dir = "runs"
cold_start_steps = 2
eval_problems = 1
eval_samples = 0
"""


def aha_up(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "up", "--json", "--config", "up.toml", *args]


def step_lines(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = [json.loads(line) for line in lines if line.endswith("}")]
    return [r["step"] for r in rows if r.get("event") == "step"]


def test_aha_up_killed_midway_resumes_without_a_second_cold_start(tmp_path):
    (tmp_path / "up.toml").write_text(CONFIG)
    run_dir = (tmp_path / "runs" / "r").resolve()
    first = ["--name", "r", "--max-steps", str(STEPS), "--engine", "hf"]
    with open(tmp_path / "first.stderr", "w") as err:
        proc = subprocess.Popen(aha_up(*first), stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 600
        while len(step_lines(run_dir)) < 2:
            assert proc.poll() is None, (tmp_path / "first.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.stderr").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # no summary, no orderly stop: a crash
        proc.wait()
    cold_start_log = (run_dir / "logs" / "cold-start.log").read_bytes()
    [weights] = (run_dir / "cold-start").glob("*.safetensors")
    cold_start_model = weights.stat().st_mtime_ns
    deadline = time.monotonic() + 60  # the parts follow their supervisor (SIGTERM on its death)
    while any(processes_with(f"{p}@{run_dir / 'logs'}") for p in ("learner", "actor-0")):
        assert time.monotonic() < deadline, "parts outlived a killed aha up"
        time.sleep(0.2)
    done_before = step_lines(run_dir)
    assert 2 <= len(done_before) < STEPS

    # --name is optional: the latest run in runs_dir is the one resumed.
    resumed = subprocess.run(
        aha_up("--resume", "--max-steps", str(STEPS), "--engine", "hf"),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["ended"] == "finished" and summary["run_dir"] == str(run_dir)
    assert summary["steps"] == STEPS  # steps 1..4 between both attempts

    # No second cold start: its log and model are as the first attempt left them.
    assert (run_dir / "logs" / "cold-start.log").read_bytes() == cold_start_log
    assert weights.stat().st_mtime_ns == cold_start_model
    assert "cold start reused" in resumed.stderr

    # The learner went on from its checkpoint: no step trained twice from scratch.
    steps = step_lines(run_dir)
    assert steps[: len(done_before)] == done_before and steps.count(1) == 1, steps
    assert max(steps) == STEPS
    assert '"event": "resumed"' in (run_dir / "logs" / "learner.log").read_text()
    assert summary["final_model"] == str(run_dir / "final")
