"""The stage loop every aha process runs: fetch, decode, handle, publish, ack.

    tasks ──▶ actor handler ──▶ rollouts ──▶ rewarder handler ──▶ scored ──▶ learner

For each message of a durable pull consumer:

- bytes that do not decode → `aha.dead.<stage>` with the raw bytes and the reason, `term()`;
- handler raises → `nak(delay)` with back-off; on the last allowed delivery the message is
  dead-lettered with the error instead; a `Refused` (what the message asks is not allowed,
  so no retry can succeed) is dead-lettered at once;
- handler returns a message → published to the next stage with `Nats-Msg-Id` (a retry is
  deduplicated by the server), *then* the input is acked;
- handler runs long → `in_progress()` every third of the ack wait keeps the lease.

A delivery that is never acked (process killed) comes back after `ack_wait` to any replica.
One that exhausts `max_deliver` that way leaves `num_pending` but stays in a work-queue
stream forever; the server announces it with a max-deliveries advisory, which
`watch_max_deliveries` turns into a dead letter and removes from the stream.

The learner, which acks only after a checkpoint, uses `StageConsumer` directly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js.errors import NotFoundError
from prometheus_client import Counter
from pydantic import BaseModel

from protocol.bus import Bus
from protocol.codec import DecodeError, decode
from protocol.messages import MESSAGES
from protocol.names import Stage

log = structlog.get_logger("protocol.stage")

M = TypeVar("M", bound=BaseModel)

MESSAGES_TOTAL = Counter(
    "aha_stage_messages_total",
    "Messages handled by this process's stage loop, by outcome",
    ["stage", "outcome"],  # ok | failed | dead_letter | released
)


class Refused(ValueError):
    """What a message asks is not allowed (a task naming a model outside `actor.model_dirs`):
    no replica or retry can handle it, so it is dead-lettered at once with this reason."""


@dataclass
class Delivery(Generic[M]):
    """A decoded message and the lease on it."""

    message: M
    msg: Msg
    stage: Stage

    @property
    def deliveries(self) -> int:
        return self.msg.metadata.num_delivered

    @property
    def stream_seq(self) -> int:
        return self.msg.metadata.sequence.stream

    async def ack(self) -> None:
        await self.msg.ack()

    async def ack_sync(self, timeout: float = 5.0) -> None:
        """Ack and wait for the server to confirm it (for exactly-once bookkeeping)."""
        await self.msg.ack_sync(timeout=timeout)

    async def nak(self, delay: float | None = None) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    async def term(self) -> None:
        await self.msg.term()


class StageConsumer(Generic[M]):
    """One process's handle on a stage's shared durable consumer."""

    def __init__(self, bus: Bus, stage: Stage):
        self.bus = bus
        self.stage = stage
        self.settings = bus.config.stage(stage.name)
        self.cls: type[M] = MESSAGES[stage.message]
        self._sub = None

    async def fetch(self, batch: int, timeout: float = 1.0) -> list[Delivery[M]]:
        """Up to `batch` decoded deliveries, [] if none arrive within `timeout` seconds.

        Messages that fail to decode are dead-lettered and terminated here, never returned.
        """
        mark_holding()
        if self._sub is None:
            self._sub = await self.bus.js.pull_subscribe_bind(
                durable=self.stage.durable, stream=self.stage.stream
            )
            self.bus.track(self._sub)
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except TimeoutError:  # nats-py raises asyncio's, not nats.errors'
            return []
        deliveries = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(decode(msg.data, self.cls), msg, self.stage))
            except DecodeError as e:
                await self._bury(msg, str(e))
        return deliveries

    async def close(self) -> None:
        """Stop pulling. Leased messages stay leased until acked, nak-ed or expired."""
        if self._sub is not None:
            await self.bus.untrack(self._sub)
            self._sub = None

    async def _bury(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        await self.bus.dead_letter(
            self.stage,
            msg.data,
            reason,
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
        )
        await msg.term()
        MESSAGES_TOTAL.labels(self.stage.name, "dead_letter").inc()

    def backoff(self, deliveries: int) -> float:
        """Nak delay after the `deliveries`-th failed attempt."""
        steps = self.settings.backoff_s or [0.0]
        return steps[min(deliveries, len(steps)) - 1]

    async def fail(self, delivery: Delivery, error: BaseException) -> None:
        """A handler failed: retry later with back-off, or dead-letter on the last delivery."""
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, Refused):
            await self._bury(delivery.msg, f"refused: {error}")
        elif delivery.deliveries >= self.settings.max_deliver:
            await self._bury(
                delivery.msg, f"handler failed on all {delivery.deliveries} deliveries: {reason}"
            )
        else:
            await delivery.nak(self.backoff(delivery.deliveries))
            MESSAGES_TOTAL.labels(self.stage.name, "failed").inc()

    async def keep_alive(self, delivery: Delivery, done: asyncio.Event) -> None:
        """Send `in_progress` every third of the ack wait until `done` is set."""
        every = self.settings.ack_wait_s / 3
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=every)
            except TimeoutError:
                await delivery.in_progress()


@dataclass
class StageStats:
    """What a `run_stage` call did."""

    handled: int = 0
    published: int = 0
    duplicates: int = 0
    failed: int = 0
    released: int = 0
    started_at: float = field(default_factory=time.monotonic)


Handler = Callable[[M], Awaitable[BaseModel | None]]


async def run_stage(
    bus: Bus,
    stage: Stage,
    handler: Handler,
    *,
    output: Stage | None = None,
    stop: asyncio.Event,
    concurrency: int = 1,
    fetch_timeout: float = 1.0,
    grace_s: float = 30.0,
    max_messages: int | None = None,
) -> StageStats:
    """Feed `stage`'s messages to `handler`, up to `concurrency` at a time, until `stop`.

    The handler gets the decoded message and returns the next stage's message (published to
    `output` before the input is acked) or None. New messages are fetched as soon as a slot
    frees, so a batching engine behind the handler stays fed. On `stop`, fetching ends and
    in-flight handlers get `grace_s` seconds; the rest are cancelled and released (`nak`) at
    once for another replica. `max_messages` ends the loop after that many (tests, benches).
    """
    workers = Workers(bus, StageConsumer(bus, stage), handler, output)
    fetched = 0
    while not stop.is_set() and (max_messages is None or fetched < max_messages):
        room = concurrency - len(workers.running)
        if max_messages is not None:
            room = min(room, max_messages - fetched)
        if room <= 0:
            await _wait_any(set(workers.running), stop)
            continue
        for delivery in await workers.consumer.fetch(room, timeout=fetch_timeout):
            fetched += 1
            workers.start(delivery)
        await asyncio.sleep(0)
    await workers.wind_down(grace_s)
    await workers.consumer.close()
    return workers.stats


@dataclass
class Workers:
    """The handler tasks of one `run_stage` call, each with the delivery it holds."""

    bus: Bus
    consumer: StageConsumer
    handler: Handler
    output: Stage | None
    stats: StageStats = field(default_factory=StageStats)
    running: dict[asyncio.Task, Delivery] = field(default_factory=dict)

    def start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self.process(delivery))
        self.running[task] = delivery
        task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task) -> None:
        self.running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "stage task crashed", stage=self.consumer.stage.name, error=repr(task.exception())
            )

    async def process(self, delivery: Delivery) -> None:
        """Handle one message: publish its result, then ack; on failure retry or bury it."""
        stage = self.consumer.stage
        done = asyncio.Event()
        ticker = asyncio.create_task(self.consumer.keep_alive(delivery, done))
        try:
            result = await self.handler(delivery.message)
            if result is not None and self.output is not None:
                ack = await self.bus.publish(self.output, result)
                self.stats.published += 1
                self.stats.duplicates += int(bool(ack.duplicate))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning(
                "handler failed",
                stage=stage.name,
                stream_seq=delivery.stream_seq,
                deliveries=delivery.deliveries,
                error=repr(e),
            )
            self.stats.failed += 1
            await self.consumer.fail(delivery, e)
            return
        finally:
            done.set()
            ticker.cancel()  # never awaited: a cancellation meant for us must not land there
        await delivery.ack()
        self.stats.handled += 1
        MESSAGES_TOTAL.labels(stage.name, "ok").inc()

    async def wind_down(self, grace_s: float) -> None:
        """Give the handlers still running `grace_s` seconds, then cancel the rest and release
        (`nak`) their messages to another replica at once."""
        if not self.running:
            return
        _, pending = await asyncio.wait(set(self.running), timeout=grace_s)
        unfinished = {task: self.running[task] for task in pending}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task, delivery in unfinished.items():
            if task.cancelled():  # not acked: release it to another replica at once
                try:
                    await delivery.nak()
                except MsgAlreadyAckdError:  # cancelled just after its ack went out
                    continue
                self.stats.released += 1
                MESSAGES_TOTAL.labels(self.consumer.stage.name, "released").inc()


async def _wait_any(tasks: set[asyncio.Task], stop: asyncio.Event) -> None:
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()


async def watch_max_deliveries(bus: Bus, stage: Stage):
    """Dead-letter messages the server gave up redelivering (handler crashed every time).

    Subscribed in a queue group, so among all replicas of a stage one handles each
    advisory. Returns the subscription (unsubscribe or drain to stop).
    """

    async def on_advisory(msg: Msg) -> None:
        event = json.loads(msg.data)
        seq = int(event["stream_seq"])
        try:
            raw = await bus.js.get_msg(stage.stream, seq)
        except NotFoundError:
            return  # already acked, terminated or buried by its handler
        await bus.dead_letter(
            stage,
            raw.data or b"",
            f"not acknowledged after {event.get('deliveries')} deliveries "
            "(the handler crashed or exceeded the ack wait every time)",
            subject=raw.subject,
            stream_seq=seq,
            deliveries=event.get("deliveries"),
        )
        try:
            await bus.js.delete_msg(stage.stream, seq)
        except NotFoundError:
            pass
        MESSAGES_TOTAL.labels(stage.name, "dead_letter").inc()

    return await bus.nc.subscribe(
        stage.max_deliveries_advisory, queue=f"aha-dead-{stage.name}", cb=on_advisory
    )


class Stopped(SystemExit):
    """A signal came while the process held no message: it stops at once, `finally` blocks
    run, and uncaught it exits with status 0 like a graceful stop."""

    def __init__(self, signum: int, why: str = "before its first fetch"):
        super().__init__(0)
        self.signal = signal.Signals(signum).name
        self.why = why


_holding = False
"""Whether this process has fetched from a stage since `stop_on_signals`: from then on a
signal stops it gracefully (its messages are finished or released)."""


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a graceful shutdown (then `bus.close()` drains).

    Until the process first fetches from a stage — connecting to a server that is not
    there, loading a model, waiting for weights — it holds nothing, so a signal raises
    `Stopped` at once instead: that works in blocking calls too, where the event would only
    be seen afterwards. A second signal during a graceful stop also stops at once.
    """
    global _holding
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _holding = False
    signalled = False

    def on_signal(signum: int, frame) -> None:
        nonlocal signalled
        if loop.is_closed():  # left over from a finished run (tests): the default behaviour
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)
            signal.raise_signal(signum)
            return
        if not _holding or signalled:
            why = "a second signal while stopping" if signalled else "before its first fetch"
            raise Stopped(signum, why)
        signalled = True
        loop.call_soon_threadsafe(stop.set)

    # A Python-level handler (not `loop.add_signal_handler`): it runs in the main thread
    # between bytecodes even while a model loads synchronously.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return stop


def mark_holding() -> None:
    """From now on a signal stops this process gracefully (see `stop_on_signals`)."""
    global _holding
    _holding = True
