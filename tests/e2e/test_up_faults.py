"""`aha up` with its faults: a rewarder stopped (SIGSTOP), an actor and then the nats-server
killed with SIGKILL mid-run. The run must finish with a summary whose accounting is whole,
the killed actor must leave no process behind (vLLM's EngineCore included), and the stall
must be reported. Smallest budget that shows it: no cold start, one held-out problem."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import processes_with

pytestmark = pytest.mark.slow

STEPS = 8
CONFIG = """\
[up]
runs_dir = "runs"
cold_start_steps = 0
eval_problems = 1
eval_samples = 0
stall_after_s = 3

[actor]
enforce_eager = true  # vLLM starts (and restarts) without compiling

[bus.tasks]
ack_wait_s = 10  # the killed actor's tasks come back to its successor sooner
"""


def steps_done(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return sum('"event": "step"' in line for line in lines)


def nats_server_pid(run_dir: Path) -> int:
    store = str(run_dir / "nats" / "jetstream").encode()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nats-server") and store in argv:
            return int(entry.name)
    raise AssertionError("no nats-server for the run")


def leader(pids: set[int]) -> int:
    """The part's own process: the leader of the process group its children share."""
    leaders = []
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                leaders.append(pid)
        except ProcessLookupError:  # a short-lived helper that just exited
            pass
    [pid] = leaders
    return pid


def is_json(line: str) -> bool:
    """A log line of `aha up` (JSON off a terminal), not a part's log tail it printed."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def wait_until(predicate, proc: subprocess.Popen, err: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"aha up exited with {proc.returncode}:\n{err.read_text()[-4000:]}")
        assert time.monotonic() < deadline, err.read_text()[-4000:]
        time.sleep(0.2)


def test_aha_up_rides_out_a_stopped_rewarder_a_killed_actor_and_a_killed_server(tmp_path):
    (tmp_path / "up.toml").write_text(CONFIG)
    run_dir = (tmp_path / "runs" / "faults").resolve()
    marker = lambda part: f"{part}@{run_dir / 'logs'}"  # noqa: E731 (AHA_PART of each part)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.cli",
                "up",
                "--json",
                "--seed",
                "0",
                "--name",
                "faults",
                "--max-steps",
                str(STEPS),
                "--config",
                "up.toml",
            ],
            stdout=o,
            stderr=e,
            cwd=tmp_path,
        )
    try:
        # 1. The rewarder stopped for longer than stall_after_s while rollouts wait for it:
        #    reported, then it resumes.
        wait_until(lambda: steps_done(run_dir) >= 1, proc, err, 900)
        rewarder = leader(processes_with(marker("rewarder-0")))
        os.kill(rewarder, signal.SIGSTOP)
        time.sleep(8)
        os.kill(rewarder, signal.SIGCONT)

        # 2. An actor killed with SIGKILL: its whole tree (vLLM's EngineCore) goes with it.
        tree = processes_with(marker("actor-0"))
        assert len(tree) >= 2, tree  # the actor and its engine process
        os.kill(leader(tree), signal.SIGKILL)
        wait_until(lambda: not tree & processes_with(marker("actor-0")), proc, err, 15)

        # 3. The nats-server killed with SIGKILL once every part is connected again (the
        #    actor restarted): restarted on its ports and store, the parts reconnect.
        actor_log = run_dir / "logs" / "actor-0.log"
        wait_until(lambda: actor_log.read_text().count("actor ready") >= 2, proc, err, 600)
        os.kill(nats_server_pid(run_dir), signal.SIGKILL)

        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.read_text()[-4000:]

    summary = json.loads(out.read_text().strip().splitlines()[-1])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["ended"] == "finished" and summary["steps"] == STEPS
    assert summary["restarts"] == {"actor-0": 1, "nats": 1}, summary["restarts"]
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    assert summary["tasks_issued"] == (
        summary["groups_trained"]
        + summary["groups_dropped_stale"]
        + summary["groups_dropped_zero_variance"]
        + summary["groups_dropped_no_reward"]
        + summary["groups_dead"]
        + summary["groups_in_flight_at_stop"]
    ), summary

    logs = [json.loads(line) for line in err.read_text().splitlines() if is_json(line)]
    stalls = [r for r in logs if r["event"].startswith("stage stalled")]
    assert any(r["stage"] == "rollouts" and r["seconds_without_progress"] >= 3 for r in stalls), (
        stalls
    )
    assert any(r["event"] == "nats-server restarted" for r in logs)

    # Nothing of any part outlives the run.
    for part in ("learner", "actor-0", "rewarder-0"):
        assert not processes_with(marker(part)), part
