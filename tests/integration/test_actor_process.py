"""`aha actor` as operators run it: real processes against a real nats-server.

Most tests use the HF engine (a process is ready in seconds); one runs the vLLM engine
through the process, since starting it takes 25-40 s here. Weights are published as the
learner does (`learner.weights`), from a perturbed copy of the tiny model, and every
rollout's log-probs are checked against an HF model holding the weights of the version the
rollout claims.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from learner.logprobs import completion_logprobs, pad_batch
from learner.weights import publish_weights, version_dir, write_shards
from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.depth import queue_depth
from protocol.messages import Rollout, Sampling, WeightManifest
from protocol.names import ROLLOUTS, TASKS
from protocol.stage import StageConsumer
from tests.helpers import make_task
from tests.integration.conftest import fast_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AHA = [sys.executable, "-m", "deploy.cli"]
SAMPLING = Sampling(temperature=0.8, max_tokens=24)
G = 3


# --- the actor process -------------------------------------------------------------------


class ActorProcess:
    """One `aha actor` child; its JSON log lines go to a file the test reads."""

    def __init__(self, workdir: Path, name: str, model: Path, bus: BusConfig, **actor):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"bus": bus.model_dump(), "actor": actor}))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    *AHA,
                    "actor",
                    "--config",
                    str(config),
                    "--nats-url",
                    bus.url,
                    "--model",
                    str(model),
                    "--actor-id",
                    name,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # tracebacks, library prints
        return out

    def events(self, event: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == event]

    async def wait_for(self, event: str, timeout: float = 60.0, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.events(event):
                if all(line.get(k) == v for k, v in fields.items()):
                    return line
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {event!r} {fields} in {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    async def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"{self.name} ignored SIGTERM:\n{self.tail()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode


@pytest.fixture
def start_actor(tmp_path, tiny_model_dir):
    started: list[ActorProcess] = []

    def start(name: str, bus: BusConfig, **actor) -> ActorProcess:
        actor.setdefault("backend", "hf")
        process = ActorProcess(tmp_path, name, tiny_model_dir, bus, **actor)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.fixture
async def bus_for(nats_server):
    """`bus_for(**stage_settings)`: the test's own connection, streams set up as the actors'."""
    buses: list[Bus] = []

    async def connect(**stage_settings) -> Bus:
        config = fast_config(**stage_settings).model_copy(update={"url": nats_server.url})
        buses.append(await Bus.connect(config, name="test"))
        return buses[-1]

    yield connect
    for bus in buses:
        await bus.close()


# --- weights and log-probs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Version -> the HF model with that version's weights: 0 is the tiny model, each later
    version adds seeded noise to every parameter (a "training step")."""
    from transformers import AutoModelForCausalLM

    out = {}
    for version in range(4):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        if version:
            gen = torch.Generator().manual_seed(version)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
        out[version] = model
    return out


async def publish(bus: Bus, model, version: int, *, corrupt: bool = False) -> WeightManifest:
    """Publish `model` as `version` through the object store, as the learner does; `corrupt`
    flips one byte of the last shard after its sha256 went into the manifest."""
    directory, shared = version_dir(None, version)
    try:
        shards = write_shards(model, directory, "float32", shard_mb=0.2, shared=shared)
        assert len(shards) > 1
        if corrupt:
            path = directory / shards[-1].name
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        return await publish_weights(
            bus.js,
            directory,
            shards,
            version=version,
            step=version,
            dtype="float32",
            keep_versions=4,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def assert_logprobs_match(rollout: Rollout, model, temperature: float) -> None:
    """The behaviour log-probs the actor sent = the learner's log-probs under `model`."""
    samples = rollout.samples
    prompt = rollout.prompt_token_ids.tolist()
    args = pad_batch([prompt] * len(samples), [s.token_ids.tolist() for s in samples])
    with torch.no_grad():
        logp = completion_logprobs(model, args[0], args[2], temperature, args[1], args[3])  # [G, T]
    for i, s in enumerate(samples):
        np.testing.assert_allclose(s.logprobs, logp[i, : len(s.token_ids)].numpy(), atol=1e-4)


def assert_shapes(rollout: Rollout, tokenizer, actor_id: str) -> None:
    task = rollout.task
    assert rollout.actor_id == actor_id
    assert rollout.prompt_token_ids.tolist() == tokenizer(task.prompt).input_ids
    assert len(rollout.samples) == task.group_size
    for s in rollout.samples:
        assert 1 <= len(s.token_ids) <= task.sampling.max_tokens
        assert len(s.logprobs) == len(s.token_ids)
        assert s.token_ids.dtype == np.int32 and s.logprobs.dtype == np.float32
        assert np.all(s.logprobs <= 0) and np.all(np.isfinite(s.logprobs))
        assert s.finish_reason in ("stop", "length")
        assert s.finish_reason == "stop" or len(s.token_ids) == task.sampling.max_tokens


# --- the bus -------------------------------------------------------------------------------


async def publish_tasks(bus: Bus, ids, **kw) -> list[str]:
    tasks = [make_task(i, group_size=G, sampling=SAMPLING, **kw) for i in ids]
    for task in tasks:
        await bus.publish(TASKS, task)
    return [t.task_id for t in tasks]


async def collect(bus: Bus, n: int, timeout: float = 60.0) -> list[Rollout]:
    """The next `n` rollouts (acked), in arrival order."""
    consumer = StageConsumer(bus, ROLLOUTS)
    out: list[Rollout] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n:
            assert time.monotonic() < deadline, f"{len(out)} of {n} rollouts in {timeout} s"
            for delivery in await consumer.fetch(n - len(out), timeout=0.5):
                out.append(delivery.message)
                await delivery.ack()
    finally:
        await consumer.close()
    return out


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("aha_actor_")
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- the tests -----------------------------------------------------------------------------


async def test_tasks_become_rollouts_and_a_new_version_is_served_mid_run(
    bus_for, start_actor, models, tokenizer, tmp_path
):
    bus = await bus_for()
    tracking = {"backends": ["tensorboard"], "dir": str(tmp_path / "track")}
    actor = start_actor("a1", bus.config, tracking=tracking)
    await actor.wait_for("actor ready", policy_version=0)

    first = await publish_tasks(bus, range(3))
    rollouts = await collect(bus, 3)
    assert sorted(r.task_id for r in rollouts) == sorted(first)
    for r in rollouts:
        assert_shapes(r, tokenizer, "a1")
        assert r.policy_version == 0

    # Tasks in flight while version 1 arrives: each rollout is all one version, and its
    # log-probs are those of the version it claims. After the load, only version 1.
    racing = await publish_tasks(bus, range(3, 9))
    await publish(bus, models[1], 1)
    await actor.wait_for("weights loaded", version=1)
    after = await publish_tasks(bus, range(9, 12))
    rollouts += await collect(bus, len(racing) + len(after))

    by_id = {r.task_id: r for r in rollouts}
    assert len(by_id) == 12
    assert {by_id[t].policy_version for t in after} == {1}
    for r in rollouts:
        assert_shapes(r, tokenizer, "a1")
        assert_logprobs_match(r, models[r.policy_version], SAMPLING.temperature)
    # The new version changed the policy: its samples are unlikely under version 0's weights.
    with pytest.raises(AssertionError):
        assert_logprobs_match(by_id[after[0]], models[0], SAMPLING.temperature)

    assert await actor.stop() == 0
    assert actor.events("actor stopped")[0]["handled"] == 12

    # [actor.tracking]: each rollout's numbers and the weight load, in its own TensorBoard run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "track" / "tensorboard" / "a1"))
    events.Reload()
    tokens = events.Scalars("tokens")
    assert [e.step for e in tokens] == list(range(1, 13))  # the rollout count
    made = [sum(len(s.token_ids) for s in r.samples) for r in rollouts]
    assert sorted(e.value for e in tokens) == sorted(made)
    assert {e.value for e in events.Scalars("policy_version")} == {0, 1}
    [load] = events.Scalars("weights_load_seconds")
    assert 3 <= load.step <= 9 and load.value > 0  # after the first 3, before the last 3


async def test_a_late_actor_loads_latest_first_and_refuses_a_corrupt_version(
    bus_for, start_actor, models
):
    bus = await bus_for()
    await publish(bus, models[1], 1)
    port = free_port()
    actor = start_actor("late", bus.config, metrics_port=port)

    ready = await actor.wait_for("actor ready")
    assert ready["policy_version"] == 1
    names = [line.get("event") for line in actor.lines()]
    assert names.index("weights loaded") < names.index("actor ready")  # before any task
    await publish_tasks(bus, range(2))
    first = await collect(bus, 2)
    assert {r.policy_version for r in first} == {1}
    assert_logprobs_match(first[0], models[1], SAMPLING.temperature)

    await publish(bus, models[2], 2, corrupt=True)
    rejected = await actor.wait_for("weights rejected: still serving the old version")
    assert rejected["version"] == 2 and rejected["serving"] == 1 and rejected["level"] == "error"
    assert "sha256 mismatch" in rejected["reason"]
    await publish_tasks(bus, range(2, 4))
    still = await collect(bus, 2)
    assert {r.policy_version for r in still} == {1}
    assert_logprobs_match(still[0], models[1], SAMPLING.temperature)

    metrics = scrape(port)
    assert metrics['aha_actor_policy_version{actor="late"}'] == 1
    assert metrics['aha_actor_weights_rejected_total{actor="late"}'] == 1
    assert metrics['aha_actor_prompts_total{actor="late"}'] == 4
    tokens = sum(len(s.token_ids) for r in first + still for s in r.samples)
    assert metrics['aha_actor_tokens_total{actor="late"}'] == tokens
    assert metrics['aha_actor_weight_load_seconds{actor="late"}'] > 0
    idle = metrics['aha_actor_idle_seconds_total{actor="late"}']
    await asyncio.sleep(0.5)  # no tasks: the idle clock runs while it lasts, not afterwards
    assert scrape(port)['aha_actor_idle_seconds_total{actor="late"}'] >= idle + 0.4

    assert await actor.stop() == 0


async def test_tasks_of_an_actor_killed_mid_batch_go_to_another(bus_for, start_actor):
    bus = await bus_for(ack_wait_s=3.0)
    killed = start_actor("killed", bus.config, concurrency=4)
    await killed.wait_for("actor ready")
    ids = await publish_tasks(bus, range(12))

    # Kill it while it holds tasks it has not answered.
    deadline = time.monotonic() + 30
    while (await queue_depth(bus.js))["tasks"].ack_pending == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    held = (await queue_depth(bus.js))["tasks"].ack_pending
    assert held >= 1

    other = start_actor("other", bus.config, concurrency=4)
    rollouts = await collect(bus, len(ids), timeout=60)

    assert sorted(r.task_id for r in rollouts) == sorted(ids)  # none lost, none twice
    by_other = [r for r in rollouts if r.actor_id == "other"]
    assert len(by_other) >= held
    # Each task is acked just after its rollout is published: allow the last ack to land.
    deadline = time.monotonic() + 10
    while True:
        depth = await queue_depth(bus.js)
        left = (depth["tasks"].messages, depth["tasks"].ack_pending, depth["dead"].messages)
        if left == (0, 0, 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert left == (0, 0, 0)  # nothing held, nothing dead
    assert await other.stop() == 0


@pytest.mark.parametrize("grace_s", [0.0, 30.0], ids=["release", "finish"])
async def test_sigterm_finishes_or_releases_what_it_holds_and_exits_0(
    bus_for, start_actor, grace_s
):
    # A long ack wait: a task the actor still held at exit would stay away for a minute.
    bus = await bus_for(ack_wait_s=60.0)
    actor = start_actor("term", bus.config, concurrency=4, shutdown_grace_s=grace_s)
    await actor.wait_for("actor ready")
    ids = await publish_tasks(bus, range(8))
    await actor.wait_for("rollout")  # it holds tasks now

    assert await actor.stop() == 0

    stopped = actor.events("actor stopped")[0]
    answered = {r.task_id for r in await collect(bus, stopped["handled"])}
    if grace_s:
        assert stopped["released"] == 0 and len(answered) >= 1
    else:
        assert stopped["released"] >= 1
    # Every task not answered is back in the queue at once, not after the ack wait.
    consumer = StageConsumer(bus, TASKS)
    started = time.monotonic()
    back = {d.message.task_id for d in await consumer.fetch(len(ids), timeout=5)}
    assert time.monotonic() - started < 10
    assert back >= set(ids) - answered and back | answered == set(ids)


@pytest.mark.slow
async def test_the_vllm_engine_through_the_process(bus_for, start_actor, models, tokenizer):
    """Every check above that concerns the engine, with vLLM: start-up load, shapes,
    log-prob parity with HF on the served version, hot swap, refusal, SIGTERM."""
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install '.[cpu]'")
    bus = await bus_for(ack_wait_s=30.0)
    await publish(bus, models[1], 1)
    actor = start_actor(
        "vllm", bus.config, backend="vllm", enforce_eager=True, max_model_len=256, concurrency=8
    )
    ready = await actor.wait_for("actor ready", timeout=150)
    assert ready["policy_version"] == 1 and ready["backend"] == "vllm"

    first = await publish_tasks(bus, range(4))
    rollouts = await collect(bus, 4)
    assert {r.policy_version for r in rollouts} == {1}

    racing = await publish_tasks(bus, range(4, 10))
    await publish(bus, models[2], 2)
    await actor.wait_for("weights loaded", version=2)
    after = await publish_tasks(bus, range(10, 14))
    rollouts += await collect(bus, len(racing) + len(after))

    await publish(bus, models[3], 3, corrupt=True)
    rejected = await actor.wait_for("weights rejected: still serving the old version")
    assert rejected["version"] == 3 and "sha256 mismatch" in rejected["reason"]
    last = await publish_tasks(bus, range(14, 16))
    rollouts += await collect(bus, len(last))

    by_id = {r.task_id: r for r in rollouts}
    assert sorted(by_id) == sorted(first + racing + after + last)
    assert {by_id[t].policy_version for t in after + last} == {2}
    for r in rollouts:
        assert_shapes(r, tokenizer, "vllm")
        assert_logprobs_match(r, models[r.policy_version], SAMPLING.temperature)

    assert await actor.stop() == 0
    assert actor.events("actor stopped")[0]["handled"] == 16
