"""The demo's cold start: its progress read from the SFT process's log as it is written, and
a folder that exists only once complete."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.coldstart import complete, run_logged

# An SFT process as structlog writes it: console lines (no setup_logging), a JSON line, noise,
# then a failure.
PROGRAM = r"""
import sys, time
print("Loading weights: 100%", flush=True)
print("2026-12-02 00:20:37 [info     ] sft step        loss=3.41 lr=0.0015 step=1 tokens=1109.0", flush=True)
time.sleep(0.7)
print('{"loss": 3.1, "step": 2, "event": "sft step", "level": "info"}', flush=True)
print("2026-12-02 00:20:38 [info     ] sft step        loss=2.90 lr=0.0005 step=3", flush=True)
print("boom", file=sys.stderr, flush=True)
sys.exit(3)
"""


def test_each_step_is_reported_and_a_failure_carries_the_logs_end(tmp_path):
    log = tmp_path / "cold-start.log"
    steps: list[int] = []
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_logged([sys.executable, "-c", PROGRAM], log, {}, steps.append)
    assert steps == [1, 2, 3]
    assert failed.value.returncode == 3 and failed.value.output.endswith("boom")
    assert log.read_text().count("sft step") == 3  # the log is whole


def test_a_cold_start_counts_as_done_only_once_its_folder_has_a_model(tmp_path):
    assert not complete(tmp_path)
    (tmp_path / "cold-start.partial").mkdir()  # an interrupted export
    (tmp_path / "cold-start.partial" / "config.json").write_text("{}")
    assert not complete(tmp_path)
    (tmp_path / "cold-start.partial").rename(tmp_path / "cold-start")
    assert complete(tmp_path)
