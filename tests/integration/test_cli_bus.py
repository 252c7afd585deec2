"""`aha nats` and `aha top` as a user runs them: real processes, real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import nats
import pytest

from protocol.names import STAGES, STREAM_DEAD, TASKS
from tests.helpers import make_task

AHA = [sys.executable, "-m", "deploy.cli"]


@pytest.fixture
def aha_nats(tmp_path):
    proc = subprocess.Popen(
        [*AHA, "nats", "--store", str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline().strip()
    yield proc, first
    if proc.poll() is None:  # SIGTERM, so that `aha nats` stops its nats-server child too
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_aha_nats_prints_its_url_first_and_sets_up_the_streams(aha_nats):
    proc, first = aha_nats
    assert first.startswith("NATS_URL=nats://127.0.0.1:")
    url = first.split("=", 1)[1]
    nc = await nats.connect(url)
    js = nc.jetstream()
    names = {s.config.name for s in await js.streams_info()}
    await nc.close()
    assert {stage.stream for stage in STAGES.values()} | {STREAM_DEAD} <= names

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


async def test_aha_top_once_json_reports_depth_per_stage(aha_nats):
    _, first = aha_nats
    url = first.split("=", 1)[1]
    nc = await nats.connect(url)
    from protocol.codec import encode

    for i in range(3):
        await nc.jetstream().publish(
            TASKS.subject, encode(make_task(i)), headers={"Nats-Msg-Id": f"t{i}"}
        )
    await nc.close()

    out = subprocess.run(
        [*AHA, "top", "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NATS_URL": url},
    )
    assert out.returncode == 0, out.stderr
    depth = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(depth) == {"tasks", "rollouts", "scored", "dead"}
    assert depth["tasks"]["pending"] == 3 and depth["tasks"]["messages"] == 3
    assert depth["rollouts"]["pending"] == 0 and depth["dead"]["messages"] == 0


def test_aha_top_serves_prometheus_gauges(aha_nats):
    _, first = aha_nats
    port = free_port()
    top = subprocess.Popen(
        [*AHA, "top", "--json", "--interval", "0.2", "--prometheus", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NATS_URL": first.split("=", 1)[1]},
    )
    try:
        body = ""
        deadline = time.monotonic() + 30
        while 'aha_queue_pending{stage="tasks"}' not in body:
            assert time.monotonic() < deadline, body
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert 'aha_queue_pending{stage="tasks"} 0.0' in body
        assert 'aha_queue_messages{stage="dead"} 0.0' in body
    finally:
        top.send_signal(signal.SIGTERM)
        assert top.wait(timeout=15) == 0


def test_a_bad_config_fails_at_start_naming_the_field(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text("[bus.tasks]\nmax_deliver = 0\n")
    out = subprocess.run(
        [*AHA, "top", "--once", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "bus.tasks.max_deliver: Input should be greater than or equal to 1" in out.stderr
