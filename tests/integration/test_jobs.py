"""Jobs on the actors: a task naming a model folder is sampled with that model (the engine
switched and switched back), one outside `actor.model_dirs` is refused and dead-lettered on
its first delivery, and an actor started before the streams exist waits for them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.config import ActorConfig
from actors.hf_engine import HfEngine
from actors.service import Actor, setup_actor_engine
from protocol.bus import Bus
from protocol.codec import decode
from protocol.config import BusConfig
from protocol.messages import Sampling, Task
from protocol.names import ROLLOUTS, TASKS
from protocol.streams import ensure_streams, wait_for_streams
from tests.helpers import make_task

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SAMPLING = Sampling(temperature=1.0, max_tokens=8, seed=3)


@pytest.fixture
def models(tmp_path):
    """Two tiny models of one shape and different weights, side by side in one folder."""
    from pipeline.tiny_model import TinySpec, save_tiny_model

    return save_tiny_model(tmp_path / "m" / "a"), save_tiny_model(
        tmp_path / "m" / "b", TinySpec(seed=1)
    )


async def test_a_task_is_sampled_with_the_model_it_names_and_the_actor_switches_back(
    models, nats_server
):
    a, b = models
    config = ActorConfig(
        model=str(a), backend="hf", model_dirs=[str(b.parent)], bus=BusConfig(url=nats_server.url)
    )
    bus = await Bus.connect(config.bus, name="test")
    engine = await setup_actor_engine(config)
    actor = Actor(config, engine, engine.tokenizer, bus)
    actor.kv = await bus.js.key_value("aha-policy")
    try:
        task = make_task(1, group_size=2, sampling=SAMPLING)
        on_b = await actor.rollout(task.model_copy(update={"model": str(b), "job": "eval"}))
        assert actor.weights_of == str(b.resolve()) and on_b.policy_version == 0
        assert actor.engine is engine  # one architecture: b's weights loaded in place
        # what model b itself samples with the task's seed, in a fresh engine
        ids = HfEngine(b).tokenizer(task.prompt)["input_ids"]
        alone = await HfEngine(b).generate(ids, SAMPLING, 2)
        assert [s.text for s in on_b.samples] == [s.text for s in alone.samples]
        np.testing.assert_allclose(on_b.samples[0].logprobs, alone.samples[0].logprobs, rtol=1e-5)

        on_a = await actor.rollout(task)  # the learner's policy again: model a, version 0
        assert actor.weights_of == str(a.resolve()) and actor.serving is None
        alone = await HfEngine(a).generate(ids, SAMPLING, 2)
        assert [s.text for s in on_a.samples] == [s.text for s in alone.samples]
        assert [s.text for s in on_a.samples] != [s.text for s in on_b.samples]  # two models

        elsewhere = task.model_copy(update={"model": str(b.parent.parent)})  # above model_dirs
        with pytest.raises(ValueError, match="not under actor.model_dirs"):
            await actor.rollout(elsewhere)
        assert actor._active == 0
    finally:
        await actor.engine.close()
        await bus.close()


async def test_a_task_naming_a_model_outside_model_dirs_is_dead_lettered_at_once(
    models, nats_server
):
    a, b = models
    config = ActorConfig(
        model=str(a), backend="hf", model_dirs=[str(b)], bus=BusConfig(url=nats_server.url)
    )
    bus = await Bus.connect(config.bus, name="test")
    engine = await setup_actor_engine(config)
    actor = Actor(config, engine, engine.tokenizer, bus)
    outside = str(b.parent / "c")  # next to b, not under it
    try:
        await bus.publish(TASKS, make_task(1, model=outside, job="eval", sampling=SAMPLING))
        await bus.publish(TASKS, make_task(2, model=str(b), job="eval", sampling=SAMPLING))
        # two fetches: without the refusal the first would be retried after a back-off of 1 s
        # and dead-lettered only after max_deliver (5) deliveries
        await asyncio.wait_for(actor.run(asyncio.Event(), max_messages=2), 60)
        [letter] = await bus.dead_letters()
        assert letter.deliveries == 1 and letter.stage == "tasks"
        assert letter.error == f"refused: model {outside!r} is not under actor.model_dirs"
        assert decode(letter.data, Task).task_id == "task-1"  # the task as it was sent
        assert (await bus.js.stream_info(ROLLOUTS.stream)).state.messages == 1  # task-2's
        assert (await bus.js.stream_info(TASKS.stream)).state.messages == 0  # nothing left
    finally:
        actor.close()
        await actor.engine.close()
        await bus.close()


async def test_a_part_started_before_the_streams_waits_for_them(nats_server):
    config = BusConfig(url=nats_server.url, setup_streams=False)
    bus = await Bus.connect(config, name="early")
    try:
        waiting = asyncio.create_task(wait_for_streams(bus.js, every_s=0.1))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # no stream yet: it waits instead of failing
        await ensure_streams(bus.js, config)
        await asyncio.wait_for(waiting, 5)
        with pytest.raises(TimeoutError, match="still missing"):
            await wait_for_streams(bus.js, ["AHA_NOPE"], every_s=0.1, timeout_s=0.3)
    finally:
        await bus.close()
