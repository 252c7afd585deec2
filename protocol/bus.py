"""`Bus`: a process's one NATS connection, with the publishes every stage needs.

Only this module (and the rest of `protocol/`) builds subjects and headers: callers say
*which stage* and hand over a message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import NoStreamResponseError
from pydantic import BaseModel

from protocol.codec import encode
from protocol.config import BusConfig
from protocol.names import (
    HEADER_DELIVERIES,
    HEADER_ERROR,
    HEADER_MSG_ID,
    HEADER_STAGE,
    HEADER_STREAM_SEQ,
    HEADER_SUBJECT,
    STREAM_DEAD,
    SUBJECT_DEAD_ALL,
    Stage,
)
from protocol.streams import connect, ensure_streams

log = structlog.get_logger("protocol.bus")

MAX_REASON = 2000
"""Dead-letter reasons are cut to this many characters (headers count against max_payload)."""

_TRANSIENT = (NatsTimeoutError, asyncio.TimeoutError, NoRespondersError, NoStreamResponseError)


@dataclass(frozen=True)
class DeadLetter:
    """A message an operator must look at: what it was, where from, and why it failed."""

    stage: str
    error: str
    subject: str
    stream_seq: int | None
    deliveries: int | None
    data: bytes
    dead_seq: int
    """Sequence in the dead-letter stream."""


class Bus:
    """The process's NATS connection and JetStream context, plus its `BusConfig`."""

    def __init__(self, nc: Client, config: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self._pull_subs: list = []

    @classmethod
    async def connect(
        cls, config: BusConfig, *, name: str = "aha", url: str | None = None, setup: bool = True
    ) -> Bus:
        """Connect and (by default) make sure every stream, consumer and bucket exists.

        Set-up runs only when both `setup` and `config.setup_streams` are true.
        """
        bus = cls(await connect(config, name=name, url=url), config)
        if setup and config.setup_streams:
            await ensure_streams(bus.js, config)
        return bus

    async def publish(
        self, stage: Stage, message: BaseModel, *, retry_s: float = 30.0
    ) -> api.PubAck:
        """Publish `message` to `stage` with `Nats-Msg-Id` = its `msg_id`.

        A publish retried after a lost reply is dropped by the server's duplicate window, so
        callers may simply try again. Transient failures (server restarting) are retried for
        up to `retry_s` seconds.
        """
        return await self.publish_bytes(
            stage.subject, encode(message), msg_id=message.msg_id, retry_s=retry_s
        )

    async def publish_bytes(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: dict[str, str] | None = None,
        retry_s: float = 30.0,
    ) -> api.PubAck:
        headers = {**(headers or {}), HEADER_MSG_ID: msg_id}
        deadline = time.monotonic() + retry_s
        delay = 0.1
        while True:
            try:
                return await self.js.publish(subject, data, headers=headers, timeout=5.0)
            except _TRANSIENT as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("publish retry", subject=subject, error=repr(e), delay=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dead_letter(
        self,
        stage: Stage,
        data: bytes,
        reason: str,
        *,
        subject: str | None = None,
        stream_seq: int | None = None,
        deliveries: int | None = None,
    ) -> None:
        """Park `data` on `aha.dead.<stage>` with the reason, for an operator to inspect."""
        headers = {
            HEADER_STAGE: stage.name,
            HEADER_ERROR: reason[:MAX_REASON].replace("\r", " ").replace("\n", " "),
            HEADER_SUBJECT: subject or stage.subject,
        }
        if stream_seq is not None:
            headers[HEADER_STREAM_SEQ] = str(stream_seq)
        if deliveries is not None:
            headers[HEADER_DELIVERIES] = str(deliveries)
        msg_id = f"dead.{stage.stream}.{stream_seq}" if stream_seq else f"dead.{time.time_ns()}"
        await self.publish_bytes(stage.dead_subject, data, msg_id=msg_id, headers=headers)
        log.warning(
            "dead letter", stage=stage.name, reason=headers[HEADER_ERROR], stream_seq=stream_seq
        )

    async def dead_letters(self, limit: int = 1000, *, after: int = 0) -> list[DeadLetter]:
        """Read (without removing) up to `limit` dead letters with a sequence above `after`,
        oldest first."""
        info = await self.js.stream_info(STREAM_DEAD)
        out: list[DeadLetter] = []
        seq = max(info.state.first_seq, after + 1)
        while seq and seq <= info.state.last_seq and len(out) < limit:
            try:
                raw = await self.js.get_msg(STREAM_DEAD, seq)
            except Exception:  # deleted in between
                seq += 1
                continue
            h = raw.headers or {}
            out.append(
                DeadLetter(
                    stage=h.get(HEADER_STAGE, ""),
                    error=h.get(HEADER_ERROR, ""),
                    subject=h.get(HEADER_SUBJECT, ""),
                    stream_seq=int(h[HEADER_STREAM_SEQ]) if HEADER_STREAM_SEQ in h else None,
                    deliveries=int(h[HEADER_DELIVERIES]) if HEADER_DELIVERIES in h else None,
                    data=raw.data or b"",
                    dead_seq=raw.seq,
                )
            )
            seq += 1
        return out

    def track(self, sub) -> None:
        """Remember a pull subscription so `close` can end it first."""
        self._pull_subs.append(sub)

    async def untrack(self, sub) -> None:
        self._pull_subs.remove(sub)
        if not self.nc.is_closed:
            await sub.unsubscribe()

    async def close(self) -> None:
        """Drain: finish in-flight publishes and acks, then close.

        Pull subscriptions are unsubscribed first: a fetch that timed out leaves the server's
        408 status message in the subscription's queue, and nats-py's drain would wait for it
        until its drain timeout (the bug nats.java fixed in nats-io/nats.java#1009).
        """
        if self.nc.is_closed:
            return
        for sub in list(self._pull_subs):
            await self.untrack(sub)
        try:
            await self.nc.drain()
        except ConnectionClosedError:
            pass


__all__ = ["Bus", "DeadLetter", "SUBJECT_DEAD_ALL"]
