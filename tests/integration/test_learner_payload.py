"""Message sizes against the server's max_payload, with a real nats-server and learner.

Groups of G × max_tokens that the server cannot carry stop the learner at start with the
fields named; a dataset row too large for the bus is skipped and counted, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

from learner.config import DatasetConfig
from learner.outcomes import ISSUED
from protocol.bus import Bus
from protocol.config import ConfigError
from protocol.messages import payload_limit
from protocol.server import NatsServer

from .test_learner_loop import learner_bus, learner_config, play_actor_and_rewarder, read_lines

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SMALL = 256 * 1024
"""The test server's max_payload: a quarter of NATS's default, so the test rows stay small."""


@pytest.fixture
def small_server(tmp_path):
    with NatsServer(tmp_path / "nats", max_payload=SMALL) as server:
        yield server


def test_servers_are_sized_for_long_reasoning_groups():
    # 16 completions × 32k tokens: ~8 MiB of ids, log-probs and text, plus a quarter.
    assert payload_limit(16, 32 * 1024) == 11 * 2**20
    assert payload_limit(8, 256) == 8 * 2**20  # never below what compose and Helm set
    assert payload_limit(256, 32 * 1024) == 64 * 2**20  # nor above what NATS allows
    deploy = Path(__file__).parents[2] / "deploy"
    compose = re.search(r'"max_payload": (\d+)', (deploy / "nats" / "nats.conf").read_text())
    helm = yaml.safe_load((deploy / "helm" / "aha" / "values.yaml").read_text())
    assert int(compose.group(1)) == helm["nats"]["config"]["merge"]["max_payload"] == 8 * 2**20


async def test_groups_the_server_cannot_carry_stop_the_learner_at_start(
    small_server, tmp_path, tiny_model_dir
):
    from learner.loop import run

    config = learner_config(tmp_path, tiny_model_dir, small_server.url)
    dataset = config.dataset.model_copy(update={"group_size": 16, "max_tokens": 4096})
    config = config.model_copy(update={"dataset": dataset})
    with pytest.raises(
        ConfigError,
        match=(
            r"learner\.dataset\.group_size × learner\.dataset\.max_tokens = 16 × 4096 makes scored "
            r"groups of up to 1\.0 MiB, more than the NATS server's max_payload of 0\.2 MiB"
        ),
    ):
        await asyncio.wait_for(run(config), timeout=120)


async def test_a_row_too_large_for_the_bus_is_skipped_and_counted(
    small_server, tmp_path, tiny_model_dir
):
    from learner.loop import run

    config = learner_config(
        tmp_path, tiny_model_dir, small_server.url, max_steps=2, final_model_dir=None
    )
    # Three ordinary rows and one whose prompt alone is 300 kB (with its tokens, far more
    # than the server takes): every pass over the data meets it once.
    rows = [json.loads(line) for line in open(config.dataset.path)][:3]
    rows.append({"prompt": "Q:" + "1" * 300_000 + "=", "answer": "0"})
    path = tmp_path / "with-a-huge-row.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset: DatasetConfig = config.dataset.model_copy(update={"path": str(path)})
    config = config.model_copy(update={"dataset": dataset})

    bus = await Bus.connect(learner_bus(small_server.url), name="test")
    assert bus.nc.max_payload == SMALL
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played)
    )
    try:
        assert await asyncio.wait_for(run(config), timeout=240) == 0
    finally:
        stop.set()
        await actor
        await bus.close()

    done = read_lines(tmp_path / "metrics.jsonl")[-1]
    assert done["event"] == "done" and done["groups_trained"] == 4
    assert done["groups_dropped_too_large"] >= 1
    assert done["tasks_issued"] == (
        sum(done[o.key] for o in ISSUED) + done["groups_in_flight_at_stop"]
    )
