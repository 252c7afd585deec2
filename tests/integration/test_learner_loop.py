"""The learner's step loop against a real nats-server, with the test playing actor and rewarder.

The "actor" is the real HF engine on the tiny demo model, loading every weight version the
learner publishes; the "rewarder" scores with the real reward functions. Tasks flow, versions
advance, a manifest appears in KV and staleness stays within the bound.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError

from learner.config import (
    DatasetConfig,
    DeepSpeedConfig,
    GRPOConfig,
    LearnerConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
)
from learner.outcomes import ISSUED
from protocol.codec import decode
from protocol.config import BusConfig, StageConfig
from protocol.messages import Rollout, Score, ScoredRollout, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, SCORED, TASKS
from protocol.stage import StageConsumer

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed variables a learner started in this process leaves in os.environ."""

REWARDS = {"accuracy_gsm8k": 1.0, "format_think": 0.1}


def learner_bus(url: str) -> BusConfig:
    """Leases long enough for a step on 2 busy cores, short enough to see a redelivery."""
    settings = StageConfig(ack_wait_s=4.0, max_deliver=20, backoff_s=[0.1])
    return BusConfig(
        url=url, tasks=settings, rollouts=settings, scored=settings, duplicate_window_s=600
    )


def write_dataset(path: Path, n: int = 24) -> Path:
    from pipeline.demo import rl_prompts, write_jsonl

    return write_jsonl(rl_prompts(n, seed=7, exclude=set()), path)


def learner_config(tmp_path: Path, model_dir: Path, url: str, **overrides) -> LearnerConfig:
    values = dict(
        model=ModelConfig(path=str(model_dir)),
        optim=OptimConfig(lr=1e-3),
        deepspeed=DeepSpeedConfig(precision="fp32", micro_batch=8),
        grpo=GRPOConfig(beta=0.0, mode="token-mean"),
        batch=2,
        max_staleness=1,
        max_steps=3,
        serving_dtype="float32",
        shard_mb=1,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        weights_dir=str(tmp_path / "weights"),
        metrics_file=str(tmp_path / "metrics.jsonl"),
        final_model_dir=str(tmp_path / "final"),
        dataset=DatasetConfig(
            path=str(write_dataset(tmp_path / "rl.jsonl")),
            prompt_field="prompt",
            answer_field="answer",
            template="none",
            rewards=REWARDS,
            meta={"answer_tag": True},
            group_size=2,
            max_tokens=12,
        ),
        bus=learner_bus(url),
    )
    return LearnerConfig(**{**values, **overrides})


async def play_actor_and_rewarder(
    bus,
    model_dir: Path,
    scratch: Path,
    stop: asyncio.Event,
    log: list,
    bury: int = 0,
    tamper=None,
):
    """Take tasks, sample with the newest published weights, score, publish scored groups.

    Appends `(task_id, policy_version, learner_version_at_issue)` per group to `log`. The
    first `bury` tasks are dead-lettered instead, as an actor that fails on them would.
    `tamper(i, scored)`, when given, returns what is published for the i-th group instead:
    a `ScoredRollout` or raw bytes (what a buggy or hostile rewarder could send).
    """
    from actors.hf_engine import HfEngine
    from actors.weights import load_manifest
    from rewarder.rewards import grade

    engine = HfEngine(model_dir)
    tasks = StageConsumer(bus, TASKS)
    kv = None
    while not stop.is_set():
        try:
            kv = kv or await bus.js.key_value(KV_POLICY)
            manifest = decode((await kv.get(KEY_LATEST)).value, WeightManifest)
        except KeyNotFoundError:  # the learner has not published yet
            manifest = None
        except NatsTimeoutError:  # the learner in this event loop held it (its setup), ask again
            continue
        if manifest is not None and manifest.version > engine.version:
            await load_manifest(engine, bus.js, manifest, scratch)
        deliveries = await tasks.fetch(4, timeout=0.5)
        while deliveries and bury > 0:
            d, deliveries, bury = deliveries[0], deliveries[1:], bury - 1
            await bus.dead_letter(
                TASKS,
                d.msg.data,
                "handler failed on all deliveries: test",
                stream_seq=d.stream_seq,
                deliveries=d.deliveries,
            )
            await d.term()
        if not deliveries:
            continue
        first = deliveries[0].message
        generations = await engine.generate_batch(
            [d.message.prompt_token_ids for d in deliveries], first.sampling, first.group_size
        )
        for delivery, generation in zip(deliveries, generations, strict=True):
            task = delivery.message
            rollout = Rollout(
                task=task,
                policy_version=generation.policy_version,
                actor_id="test-actor",
                prompt_token_ids=task.prompt_token_ids,
                samples=generation.samples,
            )
            scores = []
            for sample in generation.samples:
                reward, components, error, _ = grade(
                    sample.text, task.reference, task.rewards, task
                )
                scores.append(Score(reward=reward, components=components, error=error))
            scored = ScoredRollout(rollout=rollout, scores=scores)
            if tamper is not None:
                scored = tamper(len(log), scored)
            if isinstance(scored, bytes):
                await bus.publish_bytes(SCORED.subject, scored, msg_id=f"{task.task_id}.scored")
            else:
                await bus.publish(SCORED, scored)
            await delivery.ack()
            log.append((task.task_id, generation.policy_version, task.issued_version))
    await tasks.close()


async def left_in_stream(bus, timeout: float = 1.0) -> list[str]:
    """Task ids of the scored groups nobody acknowledged (fetched and left unacked)."""
    consumer, ids = StageConsumer(bus, SCORED), []
    while deliveries := await consumer.fetch(16, timeout=timeout):
        ids += [d.message.task_id for d in deliveries]
    await consumer.close()
    return ids


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_learner_steps_publish_weights_and_stop_at_max_steps(
    nats_server, bus, tmp_path, tiny_model_dir
):
    from learner import tracking
    from learner.loop import run
    from learner.metrics import STEP_KEYS

    port = free_port()
    board = TrackingConfig(backends=["tensorboard"], samples_every_n_steps=2, samples_per_step=1)
    config = learner_config(
        tmp_path, tiny_model_dir, nats_server.url, metrics_port=port, tracking=board
    )
    # Upload folders of a learner killed mid-upload, a folder of someone else's, and a
    # version an earlier run got to (v9, on the volume and in the store): this run publishes
    # versions 0 to 3, and pruning to the newest 2 must keep its own.
    for name in (".v7-upload-k1ll3d", ".v8-upload-x_2", "notes", "v9"):
        (tmp_path / "weights" / name).mkdir(parents=True)
        (tmp_path / "weights" / name / "model.safetensors").write_bytes(b"left")
    from protocol.names import OBJECT_STORE_WEIGHTS

    store = await bus.js.object_store(OBJECT_STORE_WEIGHTS)
    await store.put("v9/model.safetensors", b"an earlier run's")
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played)
    )
    try:
        assert await asyncio.wait_for(run(config), timeout=240) == 0
    finally:
        stop.set()
        await actor
        tracking.stop()

    lines = read_lines(tmp_path / "metrics.jsonl")
    steps = [r for r in lines if r["event"] == "step"]
    done = lines[-1]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["version"] for r in steps] == [1, 2, 3]
    assert all(set(STEP_KEYS) <= set(r) for r in steps)
    assert all(r["staleness_max"] <= config.max_staleness for r in steps)
    assert all(len(r["task_ids"]) == config.batch for r in steps)
    trained = [t for r in steps for t in r["task_ids"]]
    assert len(set(trained)) == len(trained) == 6
    assert done["event"] == "done" and done["steps"] == 3 and done["groups_trained"] == 6
    # Every task issued was consumed (trained or dropped) or is still in flight, within the bound.
    consumed = sum(done[o.key] for o in ISSUED)
    assert done["tasks_issued"] == consumed + done["groups_in_flight_at_stop"]
    assert done["groups_in_flight_at_stop"] <= config.in_flight_limit
    assert all(r["groups_in_flight"] <= config.in_flight_limit for r in steps)
    # The actor served the learner's versions: later groups were sampled by newer weights.
    assert max(v for _, v, _ in played) >= 1
    kv = await bus.js.key_value(KV_POLICY)
    manifest = decode((await kv.get(KEY_LATEST)).value, WeightManifest)
    assert manifest.version == 3 and manifest.step == 3
    # Served over HTTP, its store copy followed the manifest in the background; the learner
    # waited for it before exiting, so an actor joining later finds it in the store.
    assert not manifest.stored
    from learner.weights import stored_versions
    from protocol.weights import check_object, object_name

    for shard in manifest.shards:
        await check_object(store, object_name(3, shard.name), shard)
    stored = await stored_versions(store)
    assert 3 in stored and 9 not in stored  # v9 removed at start
    # keep_versions=2; the leftovers removed at start, the learner's own uploads cleaned up
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["notes", "v2", "v3"]
    assert (Path(done["final_model"]) / "config.json").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(done["final_model"])
    AutoTokenizer.from_pretrained(done["final_model"])

    import urllib.request

    url = f"http://127.0.0.1:{port}/metrics"
    scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    for name in (
        "aha_learner_loss",
        "aha_learner_wait_share",
        "aha_learner_staleness_bucket",
        'aha_learner_reward_mean{component="accuracy_gsm8k"}',
        'aha_learner_groups{outcome="trained"} 6.0',
        "aha_learner_weight_publish_seconds",  # the dashboard's weights panel
        "aha_learner_weight_store_upload_seconds",
    ):
        assert name in scraped, name
    publish = [
        line
        for line in scraped.splitlines()
        if line.startswith(("aha_learner_weight_publish_", "aha_learner_weight_store_upload_"))
    ]
    assert all(float(line.split()[-1]) > 0 for line in publish), publish

    # [learner.tracking]: the same step numbers in TensorBoard, in the run folder (next to
    # metrics.jsonl), and step 2's first trained group as the samples table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [
        (r["step"], pytest.approx(r["reward"])) for r in steps
    ]
    assert [e.value for e in events.Scalars("groups_trained")] == [2, 4, 6]
    [table] = events.Tensors("samples/text_summary")
    assert table.step == 2
    assert f"| {steps[1]['task_ids'][0]} |" in table.tensor_proto.string_val[0].decode()


async def test_stop_hands_back_the_partial_batch_and_checkpoints_trained_steps(
    nats_server, bus, tmp_path, tiny_model_dir
):
    """SIGTERM/SIGINT (the `stop` event): steps trained since the last checkpoint are
    checkpointed and acked, the groups of the unfinished step are handed back (nak)."""
    from learner.loop import run
    from learner.metrics import STEP

    STEP.set(0)  # a module-global gauge: an earlier test in this process may have set it
    # checkpoint_every=100: nothing is checkpointed (nor acked) before the stop.
    config = learner_config(
        tmp_path, tiny_model_dir, nats_server.url, max_steps=None, checkpoint_every=100, batch=3
    )
    stop, halt_actor, played = asyncio.Event(), asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", halt_actor, played)
    )
    learner = asyncio.create_task(run(config, stop=stop))
    while STEP._value.get() < 2:  # two steps trained
        await asyncio.sleep(0.05)
    assert not (tmp_path / "metrics.jsonl").exists()  # step lines wait for their checkpoint
    halt_actor.set()
    await actor
    await asyncio.sleep(1.5)  # the learner holds the partial batch of step 3 (or trained it)
    stop.set()
    assert await asyncio.wait_for(learner, timeout=60) == 0

    steps = [r for r in read_lines(tmp_path / "metrics.jsonl") if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
    # Every trained step is checkpointed at the stop, between two checkpoint_every.
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step{len(steps)}"
    consumed = {t for r in steps for t in r["task_ids"] + r["task_ids_dropped"]}
    scored = {t for t, _, _ in played}
    assert consumed <= scored
    # The rest was handed back (nak): deliverable at once, not only after the 4 s ack wait.
    started = asyncio.get_running_loop().time()
    left = await left_in_stream(bus, timeout=0.5)
    assert set(left) == scored - consumed and len(left) == len(set(left))
    assert asyncio.get_running_loop().time() - started < 2.5


async def test_dead_lettered_tasks_free_their_place_and_are_counted(
    nats_server, bus, tmp_path, tiny_model_dir
):
    # η = 0 and batch 2: two places in flight. The actor buries the first two tasks; unless
    # the learner frees their places, nothing more is ever issued and it waits forever.
    from learner.loop import run

    config = learner_config(tmp_path, tiny_model_dir, nats_server.url, max_staleness=0, max_steps=2)
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played, bury=2)
    )
    try:
        assert await asyncio.wait_for(run(config), timeout=240) == 0
    finally:
        stop.set()
        await actor

    done = read_lines(tmp_path / "metrics.jsonl")[-1]
    assert done["event"] == "done" and done["groups_trained"] == 4 and done["groups_dead"] == 2
    assert done["tasks_issued"] == (
        sum(done[o.key] for o in ISSUED) + done["groups_in_flight_at_stop"]
    )
    assert len(await bus.dead_letters()) == 2
