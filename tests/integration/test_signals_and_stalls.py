"""Parts stop on a signal in every phase, and a stage that stops moving is reported.

Real processes: `aha rewarder` / `aha actor` / `aha top` started as commands, a real
nats-server where one is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.depth import queue_depth
from protocol.names import ROLLOUTS
from protocol.server import NatsServer
from tests.helpers import make_rollout, make_task

AHA = [sys.executable, "-m", "deploy.cli"]


def free_port() -> int:
    """A port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


def wait_for_line(stream, needle: str, timeout: float) -> list[str]:
    """Lines of `stream` up to the first that contains `needle`."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n{''.join(lines)[-3000:]}")


def assert_stops_on(proc: subprocess.Popen, sig: signal.Signals, within: float) -> None:
    proc.send_signal(sig)
    started = time.monotonic()
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        raise AssertionError(f"still running {within}s after {sig.name}") from e
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert time.monotonic() - started < within


def test_the_rewarder_stops_on_sigterm_while_connecting_to_a_server_that_is_not_there():
    proc = start([*AHA, "rewarder", "--nats-url", f"nats://127.0.0.1:{free_port()}"])
    # Connecting retries forever; each refused attempt is logged.
    wait_for_line(proc.stderr, "nats error", timeout=60)
    assert_stops_on(proc, signal.SIGTERM, within=5)
    assert "stopped before its first rollout" in proc.stderr.read()


def test_the_rewarder_stops_on_sigint_while_connecting_too():
    proc = start([*AHA, "rewarder", "--nats-url", f"nats://127.0.0.1:{free_port()}"])
    wait_for_line(proc.stderr, "nats error", timeout=60)
    assert_stops_on(proc, signal.SIGINT, within=5)


def test_the_actor_stops_on_sigterm_while_connecting(tiny_model_dir, tmp_path):
    config = tmp_path / "aha.toml"
    config.write_text(f'[actor]\nmodel = "{tiny_model_dir}"\nbackend = "hf"\n')
    proc = start(
        [*AHA, "actor", "--config", str(config), "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    )
    wait_for_line(proc.stderr, "nats error", timeout=90)
    assert_stops_on(proc, signal.SIGTERM, within=5)
    assert "stopped before its first task" in proc.stderr.read()


def test_the_learner_stops_on_sigterm_while_connecting(tiny_model_dir, tmp_path):
    data = tmp_path / "rl.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q:{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    config = tmp_path / "aha.toml"
    config.write_text(
        f'[learner]\nbatch = 2\nserving_dtype = "float32"\ncheckpoint_dir = "{tmp_path / "ckpt"}"\n'
        f'[learner.model]\npath = "{tiny_model_dir}"\n'
        '[learner.deepspeed]\nprecision = "fp32"\nmicro_batch = 2\n'
        f'[learner.dataset]\npath = "{data}"\nprompt_field = "prompt"\nanswer_field = "answer"\n'
        'template = "none"\ngroup_size = 2\nmax_tokens = 8\nrewards = {accuracy_gsm8k = 1.0}\n'
    )
    proc = start(
        [*AHA, "learner", "--config", str(config), "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    )
    wait_for_line(proc.stderr, "nats error", timeout=120)  # model and DeepSpeed loaded first
    assert_stops_on(proc, signal.SIGTERM, within=5)
    err = proc.stderr.read()
    assert "learner stopped at once" in err and "before its first fetch" in err


async def test_a_stopped_rewarder_is_reported_as_a_stall_by_aha_top(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusConfig(url=server.url), name="test")
        rewarder = start([*AHA, "rewarder", "--nats-url", server.url, "--workers", "1"])
        top = None
        try:
            # The rewarder is ready once its pull request waits at the server.
            deadline = time.monotonic() + 60
            while (await queue_depth(bus.js))["rollouts"].waiting == 0:
                assert time.monotonic() < deadline and rewarder.poll() is None
                await asyncio.sleep(0.2)
            rewarder.send_signal(signal.SIGSTOP)  # alive, holding its lease, doing nothing
            for i in range(3):
                await bus.publish(ROLLOUTS, make_rollout(make_task(i)))

            top = start(
                [
                    *AHA,
                    "top",
                    "--nats-url",
                    server.url,
                    "--json",
                    "--interval",
                    "0.5",
                    "--stall-after",
                    "2",
                ]
            )
            lines = await asyncio.to_thread(wait_for_line, top.stderr, "stage stalled", 60)
            warning = json.loads(lines[-1])  # logs are JSON lines off a terminal
            assert warning["level"] == "warning" and warning["stage"] == "rollouts"
            assert warning["pending"] + warning["ack_pending"] == 3
            assert warning["seconds_without_progress"] >= 2
            rows = [json.loads(line) for line in wait_for_line(top.stdout, "stalled_s", 10)]
            assert all("stalled_s" not in row["rollouts"] for row in rows[:-1])
            row = rows[-1]  # the live view: the same stage, marked in its row
            assert row["rollouts"]["stalled_s"] >= 2
            assert row["rollouts"]["pending"] + row["rollouts"]["ack_pending"] == 3
            assert "stalled_s" not in row["tasks"]  # nothing waits there

            rewarder.send_signal(signal.SIGCONT)  # it scores again: the stall ends
            await asyncio.to_thread(wait_for_line, top.stderr, "stage progressing again", 60)
            assert_stops_on(top, signal.SIGTERM, within=5)
            assert_stops_on(rewarder, signal.SIGTERM, within=30)
        finally:
            for proc in (rewarder, top):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
            await bus.close()
