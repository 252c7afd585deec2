"""What a person reads from `aha up`: a part's exit in words, and the run's summary."""

from __future__ import annotations

import json

from deploy.live import print_summary, readable, report_exit
from deploy.supervisor import Exit


def test_a_parts_json_log_tail_is_shown_as_readable_lines():
    tail = "\n".join(
        [
            json.dumps(
                {
                    "error": "boom",
                    "event": "handler failed",
                    "process": "actor",
                    "level": "warning",
                    "timestamp": "2026-12-02T00:16:23.304222Z",
                }
            ),
            "Traceback (most recent call last):",
        ]
    )
    assert readable(tail).splitlines() == [
        "  00:16:23 warning handler failed error=boom",
        "  Traceback (most recent call last):",
    ]


def test_a_learner_that_finished_ends_the_run_without_a_word(capsys):
    from rich.console import Console

    console = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    tail = json.dumps({"event": "learner stopped", "level": "info"})
    assert report_exit(console, Exit("learner", 0, False, tail)) == ("finished", 0)
    assert report_exit(console, Exit("learner", 1, False, tail)) == ("learner exited with 1", 1)
    assert report_exit(console, Exit("actor-0", -9, True, tail)) is None


def test_the_summary_reads_before_to_after_and_says_where_the_run_is(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    summary = {
        "ended": "finished",
        "steps": 60,
        "wall_seconds": 252.4,
        "rl_seconds": 90.0,
        "accuracy_before": 0.12,
        "accuracy_after": 0.982,
        "pass_at_1_before": 0.4,
        "pass_at_1_after": None,
        "length_before": 18.25,
        "length_after": 33.0,
        "groups_trained": 960,
        "groups_dropped_stale": 12,
        "groups_dropped_zero_variance": 40,
        "groups_dead": 0,
        "groups_in_flight_at_stop": 16,
        "run_dir": str(run_dir),
        "plot": str(run_dir / "curves.png"),
        "final_model": None,
    }
    print_summary(summary)
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "aha up finished: 60 steps in 4m 12s (RL 1m 30s)",
        "  held-out accuracy  0.120 → 0.982",
        "  pass@1             0.400 → —",
        "  length (tokens)    18.2 → 33.0",
        "  groups             960 trained, 12 dropped stale, 40 dropped zero variance, 16 in flight",
        f"  run                {run_dir}/ (summary.json, logs/)",
        f"  plot               {run_dir / 'curves.png'}",
    ]


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """Under the live table rich swaps `sys.stderr` for a proxy that prints above it; a log line
    written to the stream of set-up time would tear through the table instead."""
    import io
    import sys

    import structlog

    from deploy.live import log_above_the_table
    from protocol.log import setup_logging

    at_setup, under_the_table = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", at_setup)
        setup_logging("up", json=True)
        log_above_the_table()
        log = structlog.get_logger("test")
        log.info("before")
        monkeypatch.setattr(sys, "stderr", under_the_table)  # as rich's Live does
        log.warning("part exited", part="actor-0")
    finally:
        structlog.reset_defaults()
    assert [json.loads(line)["event"] for line in at_setup.getvalue().splitlines()] == ["before"]
    assert json.loads(under_the_table.getvalue())["event"] == "part exited"
