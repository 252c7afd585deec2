"""The bus against a real nats-server: stages, redelivery, dedup, dead letters, depth."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from protocol.bus import Bus
from protocol.codec import encode
from protocol.config import StageConfig
from protocol.depth import queue_depth
from protocol.messages import Rollout, ScoredRollout, Task
from protocol.names import ROLLOUTS, SCORED, STAGES, TASKS
from protocol.stage import StageConsumer, run_stage, watch_max_deliveries
from protocol.streams import ensure_streams
from tests.helpers import make_rollout, make_scored, make_task
from tests.integration.conftest import fast_config


async def until(predicate, timeout: float = 10.0, every: float = 0.05):
    """Poll an async predicate until it is true (or fail after `timeout` seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(every)


async def test_a_task_travels_through_every_stage(bus):
    task = make_task(7, group_size=3)
    await bus.publish(TASKS, task)

    async def actor(t: Task) -> Rollout:
        return make_rollout(t, tokens=5, version=4)

    async def rewarder(r: Rollout) -> ScoredRollout:
        return make_scored(r)

    stop = asyncio.Event()
    a = await run_stage(bus, TASKS, actor, output=ROLLOUTS, stop=stop, max_messages=1)
    r = await run_stage(bus, ROLLOUTS, rewarder, output=SCORED, stop=stop, max_messages=1)
    assert (a.handled, a.published, r.handled, r.published) == (1, 1, 1, 1)

    learner = StageConsumer(bus, SCORED)
    [delivery] = await learner.fetch(10, timeout=2)
    scored = delivery.message
    assert scored.task_id == "task-7"
    assert scored.rollout.policy_version == 4
    assert scored.rollout.task.reference == "8"
    assert [s.reward for s in scored.scores] == [1.0, 1.0, 1.0]
    sample = scored.rollout.samples[2]
    assert sample.token_ids.dtype == np.int32 and sample.token_ids.tolist() == [2, 3, 4, 5, 6]
    assert sample.logprobs.dtype == np.float32 and sample.logprobs[0] == pytest.approx(-0.1)
    await delivery.ack_sync()

    depth = await queue_depth(bus.js)
    assert all(depth[s].messages == 0 and depth[s].pending == 0 for s in STAGES)


async def test_a_republished_message_is_delivered_once(bus):
    task = make_task(1)
    first = await bus.publish(TASKS, task)
    again = await bus.publish(TASKS, task)  # e.g. a retry after a lost PubAck
    assert not first.duplicate and again.duplicate
    assert first.seq == again.seq

    deliveries = await StageConsumer(bus, TASKS).fetch(10, timeout=1)
    assert [d.message.task_id for d in deliveries] == ["task-1"]


async def test_garbage_goes_to_dead_letters_and_the_stage_keeps_going(bus):
    await bus.js.publish(TASKS.subject, b"\xc1 not msgpack", headers={"Nats-Msg-Id": "junk"})
    wrong_type = encode(make_rollout(make_task(2)))  # valid msgpack, but not a Task
    await bus.js.publish(TASKS.subject, wrong_type, headers={"Nats-Msg-Id": "wrong"})
    await bus.publish(TASKS, make_task(3))

    seen: list[str] = []

    async def handler(t: Task) -> None:
        seen.append(t.task_id)

    stats = await run_stage(bus, TASKS, handler, stop=asyncio.Event(), max_messages=1)
    assert seen == ["task-3"] and stats.handled == 1

    dead = await bus.dead_letters()
    assert [d.data for d in dead] == [b"\xc1 not msgpack", wrong_type]
    assert all(d.stage == "tasks" and d.subject == "aha.tasks" for d in dead)
    assert dead[0].error.startswith("not a valid Task: not msgpack")
    assert "task_id: Field required" in dead[1].error
    depth = await queue_depth(bus.js)
    assert depth["tasks"].messages == 0  # terminated messages leave the work queue
    assert depth["dead"].messages == 2


async def test_a_failing_handler_is_retried_then_dead_lettered(bus):
    await bus.publish(TASKS, make_task(4))
    attempts: list[int] = []

    async def handler(t: Task) -> None:
        attempts.append(len(attempts) + 1)
        raise ValueError("verifier exploded")

    stop = asyncio.Event()
    loop = asyncio.create_task(run_stage(bus, TASKS, handler, stop=stop, fetch_timeout=0.2))
    dead = await until(bus.dead_letters)
    stop.set()
    stats = await loop

    # max_deliver=3 in fast_config: two naks (back-off 0.1 s), the third failure is final.
    assert attempts == [1, 2, 3] and stats.failed == 3
    [letter] = dead
    assert letter.deliveries == 3
    assert letter.error == "handler failed on all 3 deliveries: ValueError: verifier exploded"
    assert (await queue_depth(bus.js))["tasks"].messages == 0


CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys, time
    from protocol.bus import Bus
    from protocol.config import BusConfig
    from protocol.names import TASKS
    from protocol.stage import StageConsumer

    async def main():
        bus = await Bus.connect(BusConfig.model_validate_json(sys.argv[1]), setup=False)
        deliveries = await StageConsumer(bus, TASKS).fetch(10, timeout=5)
        print(" ".join(d.message.task_id for d in deliveries), flush=True)
        time.sleep(3600)  # hold the lease until killed

    asyncio.run(main())
    """
)


def start_crashing_consumer(bus_config) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CONSUMER, bus_config.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    return proc, proc.stdout.readline().split()


async def test_a_consumer_killed_without_acking_loses_nothing(bus, bus_config):
    for i in range(3):
        await bus.publish(TASKS, make_task(i))
    proc, held = await asyncio.to_thread(start_crashing_consumer, bus_config)
    assert held == ["task-0", "task-1", "task-2"]
    proc.kill()
    proc.wait()

    # Another replica gets all three once the dead consumer's lease (ack_wait 1 s) expires.
    consumer = StageConsumer(bus, TASKS)
    redelivered = []
    while len(redelivered) < 3:
        redelivered += await consumer.fetch(10, timeout=3)
    assert sorted(d.message.task_id for d in redelivered) == held
    assert all(d.deliveries == 2 for d in redelivered)
    for d in redelivered:
        await d.ack_sync()
    assert (await queue_depth(bus.js))["tasks"].messages == 0


async def test_max_deliveries_advisory_turns_an_abandoned_message_into_a_dead_letter(
    bus, bus_config
):
    await ensure_streams(bus.js, fast_config(max_deliver=1))
    watcher = await watch_max_deliveries(bus, TASKS)
    await bus.publish(TASKS, make_task(5))
    proc, held = await asyncio.to_thread(start_crashing_consumer, bus_config)
    assert held == ["task-5"]
    proc.kill()
    proc.wait()

    # The server only gives up when it would redeliver: keep a pull request open.
    consumer = StageConsumer(bus, TASKS)
    got = await consumer.fetch(1, timeout=2.5)
    assert got == []  # never redelivered beyond max_deliver=1 ...
    [letter] = await until(bus.dead_letters)
    await watcher.unsubscribe()
    assert letter.stage == "tasks" and letter.deliveries == 1
    assert "not acknowledged after 1 deliveries" in letter.error
    assert Task.model_validate(__import__("msgpack").unpackb(letter.data)).task_id == "task-5"
    # ... and it no longer sits invisibly in the work queue.
    assert (await queue_depth(bus.js))["tasks"].messages == 0


async def test_in_progress_keeps_a_long_handler_from_being_redelivered(bus, bus_config):
    await bus.publish(TASKS, make_task(6))
    other = await Bus.connect(bus_config, setup=False)

    started = asyncio.Event()

    async def slow(t: Task) -> None:
        started.set()
        await asyncio.sleep(2.5)  # ack_wait is 1 s

    stats_task = asyncio.create_task(
        run_stage(bus, TASKS, slow, stop=asyncio.Event(), max_messages=1)
    )
    await started.wait()
    stolen = await StageConsumer(other, TASKS).fetch(1, timeout=2.0)
    stats = await stats_task
    await other.close()
    assert stolen == [] and stats.handled == 1


async def test_stop_releases_unfinished_work_to_another_replica(bus, bus_config):
    await bus.publish(TASKS, make_task(8))
    started = asyncio.Event()

    async def stuck(t: Task) -> None:
        started.set()
        await asyncio.sleep(3600)

    stop = asyncio.Event()
    loop = asyncio.create_task(run_stage(bus, TASKS, stuck, stop=stop, grace_s=0.1))
    await started.wait()
    stop.set()
    stats = await loop
    assert stats.released == 1 and stats.handled == 0

    # Released with nak(): available at once, long before the 1 s ack wait.
    other = await Bus.connect(bus_config, setup=False)
    [d] = await StageConsumer(other, TASKS).fetch(1, timeout=0.5)
    assert d.message.task_id == "task-8" and d.deliveries == 2
    await d.ack_sync()
    await other.close()


async def test_depth_counts_what_was_published_and_consumed(bus):
    await ensure_streams(bus.js, fast_config(ack_wait_s=30))  # no redelivery mid-test
    for i in range(5):
        await bus.publish(TASKS, make_task(i))
    await bus.publish(ROLLOUTS, make_rollout(make_task(9)))
    await bus.js.publish(TASKS.subject, b"junk", headers={"Nats-Msg-Id": "junk"})

    depth = await queue_depth(bus.js)
    assert depth["tasks"].as_dict() | {"bytes": 0} == dict(
        pending=6, ack_pending=0, redelivered=0, waiting=0, messages=6, bytes=0
    )
    assert (depth["rollouts"].pending, depth["rollouts"].messages) == (1, 1)

    consumer = StageConsumer(bus, TASKS)
    got = await consumer.fetch(3, timeout=1)  # 3 valid tasks leased
    depth = await queue_depth(bus.js)
    assert (depth["tasks"].pending, depth["tasks"].ack_pending) == (3, 3)

    for d in got[:2]:
        await d.ack_sync()
    await got[2].nak()  # back to the queue, now a redelivery
    rest = []  # 3 tasks (one of them redelivered) + the junk, which is dead-lettered
    while batch := await consumer.fetch(10, timeout=1):
        rest += batch
    depth = await queue_depth(bus.js)
    assert len(rest) == 3
    assert (depth["tasks"].pending, depth["tasks"].ack_pending) == (0, 3)
    assert depth["tasks"].redelivered == 1
    assert depth["tasks"].messages == 3  # 6 - 2 acked - 1 junk terminated
    assert depth["dead"].messages == 1


async def test_acknowledged_publishes_survive_kill_9_of_the_server(nats_server, bus_config):
    bus = await Bus.connect(bus_config)
    acked: set[str] = set()

    async def publish_all(n: int) -> None:
        for i in range(n):
            await bus.publish(TASKS, make_task(i), retry_s=30)
            acked.add(f"task-{i}")

    publisher = asyncio.create_task(publish_all(1500))
    for at in (300, 800):
        await until(lambda at=at: _async(len(acked) >= at))
        nats_server.kill()  # SIGKILL mid-stream
        await asyncio.sleep(0.3)
        nats_server.start()  # same port and store: the client reconnects by itself
    await asyncio.wait_for(publisher, timeout=120)
    assert len(acked) == 1500

    consumer = StageConsumer(bus, TASKS)
    received: set[str] = set()
    while True:
        batch = await consumer.fetch(200, timeout=2)
        if not batch:
            break
        for d in batch:
            received.add(d.message.task_id)
            await d.ack()
    await bus.close()
    assert received == acked  # every acknowledged message, and (dedup) nothing else


async def _async(value):
    return value


async def test_ensure_streams_is_idempotent_and_applies_changes(bus):
    await ensure_streams(bus.js, bus.config)
    await ensure_streams(bus.js, bus.config)
    changed = fast_config().model_copy(
        update={"tasks": StageConfig(ack_wait_s=7, max_deliver=9, max_ack_pending=11)}
    )
    await ensure_streams(bus.js, changed)
    info = await bus.js.consumer_info(TASKS.stream, TASKS.durable)
    assert (info.config.ack_wait, info.config.max_deliver, info.config.max_ack_pending) == (
        7.0,
        9,
        11,
    )
    stream = await bus.js.stream_info(TASKS.stream)
    assert stream.config.retention == "workqueue"
    assert stream.config.duplicate_window == 60.0


async def test_a_stop_mid_flight_acks_or_releases_each_message_once(bus):
    # Handlers finish at all sorts of moments around the end of the grace period: each
    # message must end up either acked (gone) or released (back in the queue), never both.
    await ensure_streams(bus.js, fast_config(ack_wait_s=30))
    for i in range(40):
        await bus.publish(TASKS, make_task(i))
    rng = __import__("random").Random(0)
    done: list[str] = []

    async def handler(t: Task) -> None:
        await asyncio.sleep(rng.uniform(0.0, 0.06))
        done.append(t.task_id)

    stop = asyncio.Event()
    loop = asyncio.create_task(
        run_stage(bus, TASKS, handler, stop=stop, concurrency=10, grace_s=0.03)
    )
    await asyncio.sleep(0.25)
    stop.set()
    stats = await loop

    depth = (await queue_depth(bus.js))["tasks"]
    assert depth.messages == 40 - stats.handled  # acked ones are gone, nothing else is
    assert depth.ack_pending == 0  # released ones are not left leased until the ack wait
    assert stats.released + stats.handled <= 40
    rest = []
    consumer = StageConsumer(bus, TASKS)
    while batch := await consumer.fetch(40, timeout=0.5):
        rest += [d.message.task_id for d in batch]
    assert len(rest) == len(set(rest)) == 40 - stats.handled
