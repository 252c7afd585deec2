"""One actor, several learners one after another (a pipeline's GRPO stages on one pool): each
learner counts its versions from 0 again, names its policy in its tasks and manifests, and the
actor serves every task with the weights of the policy it names — never another learner's,
whatever the version numbers — restarting its engine only for another architecture."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from actors.config import ActorConfig
from actors.hf_engine import HfEngine
from actors.service import Actor, setup_actor_engine
from learner.weights import publish_weights, write_shards
from pipeline.tiny_model import TinySpec, save_tiny_model
from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.messages import Sampling
from protocol.names import KV_POLICY
from protocol.stage import Refused
from tests.helpers import make_task

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SAMPLING = Sampling(temperature=1.0, max_tokens=8, seed=5)
STUDENT = TinySpec(hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=96)


async def publish(js, folder, tmp_path, policy: str, version: int, start):
    """`folder`'s weights as `policy`'s version `version`, a learner started from `start`."""
    module = AutoModelForCausalLM.from_pretrained(folder)
    out = tmp_path / "learner" / f"{policy}-v{version}"
    shards = write_shards(module, out, "float32", shard_mb=64, shared=False)
    await publish_weights(
        js,
        out,
        shards,
        version=version,
        step=version,
        dtype="float32",
        keep_versions=3,
        policy=policy,
        model=str(start),
    )


async def alone(folder, task):
    """What `folder` samples for `task` in a fresh engine (same seed)."""
    engine = HfEngine(folder)
    ids = engine.tokenizer(task.prompt)["input_ids"]
    return [s.text for s in (await engine.generate(ids, SAMPLING, task.group_size)).samples]


async def test_each_learners_tasks_are_sampled_with_its_own_policy(nats_server, tmp_path):
    a = save_tiny_model(tmp_path / "m" / "a")
    b = save_tiny_model(tmp_path / "m" / "b", TinySpec(seed=1))
    student = save_tiny_model(tmp_path / "m" / "student", STUDENT)
    config = ActorConfig(
        model=str(a), backend="hf", model_dirs=[str(a.parent)], bus=BusConfig(url=nats_server.url)
    )
    bus = await Bus.connect(config.bus, name="test")
    engine = await setup_actor_engine(config)
    actor = Actor(config, engine, engine.tokenizer, bus)
    kv = actor.kv = await bus.js.key_value(KV_POLICY)
    task = make_task(1, group_size=2, sampling=SAMPLING)
    try:
        # stage 1's learner at v40 (b's weights, started from a)
        await publish(bus.js, b, tmp_path, "rl", 40, a)
        on = await actor.rollout(task.model_copy(update={"policy": "rl", "issued_version": 40}))
        assert on.policy_version == 40 and [s.text for s in on.samples] == await alone(b, task)

        # stage 2's learner starts at v0 (a's weights): the watcher leaves it for its first task
        await publish(bus.js, a, tmp_path, "rl-2", 0, a)
        await actor.serve_latest(kv)
        assert (actor.policy, actor.engine.version) == ("rl", 40)
        with pytest.raises(Refused, match="policy 'rl' is not the one published"):
            await actor.rollout(task.model_copy(update={"policy": "rl", "issued_version": 40}))
        on = await actor.rollout(task.model_copy(update={"policy": "rl-2"}))
        assert on.policy_version == 0 and [s.text for s in on.samples] == await alone(a, task)
        assert actor.engine is engine  # one architecture: loaded in place

        await publish(bus.js, b, tmp_path, "rl-2", 1, a)  # its v1, taken before its task
        on = await actor.rollout(task.model_copy(update={"policy": "rl-2", "issued_version": 1}))
        assert on.policy_version == 1 and [s.text for s in on.samples] == await alone(b, task)

        # a student of another architecture: the engine restarts on its folder
        await publish(bus.js, student, tmp_path, "student-rl", 0, student)
        on = await actor.rollout(task.model_copy(update={"policy": "student-rl"}))
        assert actor.engine_model == str(student.resolve()) and on.policy_version == 0
        assert [s.text for s in on.samples] == await alone(student, task)
        assert actor._active == 0
    finally:
        actor.close()
        await actor.engine.close()
        await bus.close()
