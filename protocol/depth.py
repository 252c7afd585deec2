"""Queue depth: how much work waits in front of each stage.

Per stage: `pending` (not yet delivered to anyone), `ack_pending` (delivered, not yet
acked), `redelivered` (ack-pending messages delivered more than once), `waiting` (pull
requests parked by idle consumers: a stage with `waiting > 0` and `pending == 0` is starved)
and `messages` (everything still in the stream). `dead` has only `messages`.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from protocol.names import DEAD, STAGES, STREAM_DEAD


@dataclass(frozen=True)
class Depth:
    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    waiting: int = 0
    messages: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def queue_depth(js: JetStreamContext) -> dict[str, Depth]:
    """Depth of `tasks`, `rollouts`, `scored` and `dead`, read from the server."""
    out: dict[str, Depth] = {}
    for name, stage in STAGES.items():
        stream = await js.stream_info(stage.stream)
        try:
            consumer = await js.consumer_info(stage.stream, stage.durable)
        except NotFoundError:
            consumer = None
        def count(field: str) -> int:
            return (getattr(consumer, field, None) or 0) if consumer else 0

        out[name] = Depth(
            pending=count("num_pending"),
            ack_pending=count("num_ack_pending"),
            redelivered=count("num_redelivered"),
            waiting=count("num_waiting"),
            messages=stream.state.messages,
            bytes=stream.state.bytes,
        )
    dead = await js.stream_info(STREAM_DEAD)
    out[DEAD] = Depth(messages=dead.state.messages, bytes=dead.state.bytes)
    return out


FIELDS = ("pending", "ack_pending", "redelivered", "waiting", "messages", "bytes")
GAUGES = {
    f: Gauge(f"aha_queue_{f}", f"Queue depth: {f} per stage (see protocol/depth.py)", ["stage"])
    for f in FIELDS
}


def export_depth(depth: dict[str, Depth]) -> None:
    """Set the `aha_queue_*{stage=...}` Prometheus gauges from a `queue_depth` reading."""
    for stage, d in depth.items():
        for f in FIELDS:
            GAUGES[f].labels(stage).set(getattr(d, f))


async def export_depth_forever(js: JetStreamContext, interval_s: float = 5.0) -> None:
    """Refresh the gauges every `interval_s` (a background task any process can start
    next to `prometheus_client.start_http_server`)."""
    while True:
        export_depth(await queue_depth(js))
        await asyncio.sleep(interval_s)
