"""Queue depth: how much work waits in front of each stage.

Per stage: `pending` (not yet delivered to anyone), `ack_pending` (delivered, not yet
acked), `redelivered` (ack-pending messages delivered more than once), `waiting` (pull
requests parked by idle consumers: a stage with `waiting > 0` and `pending == 0` is starved)
and `messages` (everything still in the stream). `dead` has only `messages`.

`StallWatch` turns successive readings into stall reports: a stage with work waiting
(pending or leased) whose consumer neither acknowledged nor newly delivered anything for
`after_s` seconds — a rewarder stopped with SIGSTOP, an actor stuck in its engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from protocol.names import DEAD, STAGES, STREAM_DEAD

log = structlog.get_logger("protocol.depth")


@dataclass(frozen=True)
class Depth:
    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    waiting: int = 0
    messages: int = 0
    bytes: int = 0
    consumed: int = 0
    """Messages that left the stream since it was created (acked, terminated, expired)."""
    delivered_seq: int = 0
    """Highest stream sequence delivered to the consumer (redeliveries do not move it)."""

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in FIELDS}

    @property
    def waiting_work(self) -> int:
        """Messages the stage has yet to finish: not delivered, or delivered and not acked."""
        return self.pending + self.ack_pending

    @property
    def progress(self) -> tuple[int, int]:
        """Moves whenever the stage finishes a message or takes a new one."""
        return self.consumed, self.delivered_seq


async def queue_depth(js: JetStreamContext) -> dict[str, Depth]:
    """Depth of `tasks`, `rollouts`, `scored` and `dead`, read from the server."""
    out: dict[str, Depth] = {}
    for name, stage in STAGES.items():
        stream = await js.stream_info(stage.stream)
        try:
            consumer = await js.consumer_info(stage.stream, stage.durable)
        except NotFoundError:
            consumer = None

        def count(field: str, consumer=consumer) -> int:
            return (getattr(consumer, field, None) or 0) if consumer else 0

        delivered = getattr(consumer, "delivered", None) if consumer else None
        out[name] = Depth(
            pending=count("num_pending"),
            ack_pending=count("num_ack_pending"),
            redelivered=count("num_redelivered"),
            waiting=count("num_waiting"),
            messages=stream.state.messages,
            bytes=stream.state.bytes,
            # A work queue deletes what its consumer acks: everything ever stored less
            # what is still there has been consumed.
            consumed=(stream.state.last_seq or 0) - stream.state.messages,
            delivered_seq=(getattr(delivered, "stream_seq", None) or 0) if delivered else 0,
        )
    dead = await js.stream_info(STREAM_DEAD)
    out[DEAD] = Depth(messages=dead.state.messages, bytes=dead.state.bytes)
    return out


FIELDS = ("pending", "ack_pending", "redelivered", "waiting", "messages", "bytes")
"""What `aha top` shows and exports per stage."""
GAUGES = {
    f: Gauge(f"aha_queue_{f}", f"Queue depth: {f} per stage (see protocol/depth.py)", ["stage"])
    for f in FIELDS
}


def export_depth(depth: dict[str, Depth]) -> None:
    """Set the `aha_queue_*{stage=...}` Prometheus gauges from a `queue_depth` reading."""
    for stage, d in depth.items():
        for f in FIELDS:
            GAUGES[f].labels(stage).set(getattr(d, f))


STALL_AFTER_S = 60.0
"""Default seconds without progress, with work waiting, before a stage counts as stalled:
longer than a normal learner step or generation; raise it for long ones."""


@dataclass(frozen=True)
class Stall:
    """A stage with work waiting that has not moved for `seconds`."""

    stage: str
    pending: int
    ack_pending: int
    seconds: float


class StallWatch:
    """Stall reports from successive `queue_depth` readings, logged as warnings.

    A stage is stalled when it has work waiting (pending or leased) and its `progress`
    has not changed for `after_s` seconds. The warning names the stage, its pending and
    leased counts and the seconds without progress; it is repeated every `after_s` while the
    stall lasts, and an info line says when the stage moves again.
    """

    def __init__(self, after_s: float = STALL_AFTER_S, clock=time.monotonic):
        self.after_s = after_s
        self.clock = clock
        self._last: dict[str, tuple[tuple[int, int], float]] = {}
        """Per stage: the last progress seen and since when it has not changed."""
        self._reported: dict[str, float] = {}
        """Per stalled stage: the stall length last logged."""

    def update(self, depth: dict[str, Depth]) -> dict[str, Stall]:
        """Take a reading; return the stages stalled now."""
        now = self.clock()
        stalls = {}
        for stage, d in depth.items():
            if stage == DEAD:
                continue
            seen = self._last.get(stage)
            if seen is None or seen[0] != d.progress or d.waiting_work == 0:
                self._last[stage] = (d.progress, now)
                if self._reported.pop(stage, None) is not None:
                    log.info(
                        "stage progressing again",
                        stage=stage,
                        pending=d.pending,
                        ack_pending=d.ack_pending,
                    )
                continue
            seconds = now - seen[1]
            if seconds < self.after_s:
                continue
            stalls[stage] = Stall(stage, d.pending, d.ack_pending, round(seconds, 1))
            if seconds - self._reported.get(stage, -self.after_s) >= self.after_s:
                self._reported[stage] = seconds
                log.warning(
                    "stage stalled: work waiting, no progress",
                    stage=stage,
                    pending=d.pending,
                    ack_pending=d.ack_pending,
                    seconds_without_progress=round(seconds, 1),
                )
        return stalls
