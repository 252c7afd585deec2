"""The learner refuses poison on `aha.scored`, against a real nats-server and DeepSpeed.

The test plays actor and rewarder (real HF engine, real rewards) and tampers with some of
the scored groups it publishes, as a buggy or hostile rewarder could: groups under task ids
the learner never issued, a behaviour version from the future, a NaN reward, and rewards
that are finite but overflow the advantage (the update's loss turns NaN). None of them may
be trained; each is dead-lettered with its reason and counted, and the run's accounting of
issued tasks stays whole.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from learner.dispatcher import run_key
from learner.outcomes import ISSUED
from protocol.codec import encode
from protocol.messages import Score, ScoredRollout
from protocol.names import SCORED

from .test_learner_exactly_once import learner_process
from .test_learner_loop import learner_config, play_actor_and_rewarder, read_lines

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

HUGE = 1.7e308
"""A finite reward whose group mean overflows to inf: the advantages become NaN."""


def overflowing(scored: ScoredRollout) -> ScoredRollout:
    scores = [Score(reward=HUGE, components={"accuracy_gsm8k": HUGE}) for _ in scored.scores]
    return scored.model_copy(update={"scores": scores})


def forged(scored: ScoredRollout, task_id: str) -> ScoredRollout:
    task = scored.rollout.task.model_copy(update={"task_id": task_id})
    return scored.model_copy(update={"rollout": scored.rollout.model_copy(update={"task": task})})


def with_nan_reward(scored: ScoredRollout) -> bytes:
    nan = Score.model_construct(
        reward=math.nan, components={"accuracy_gsm8k": math.nan}, error=None
    )
    return encode(scored.model_copy(update={"scores": [nan, *scored.scores[1:]]}))


def accounted(done: dict) -> int:
    return sum(done[o.key] for o in ISSUED) + done["groups_in_flight_at_stop"]


def final_weights_finite(folder: str) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


async def test_poisoned_scored_groups_are_dead_lettered_counted_and_never_trained(
    nats_server, bus, tmp_path, tiny_model_dir
):
    from learner.loop import run

    config = learner_config(tmp_path, tiny_model_dir, nats_server.url, max_steps=2)
    key = run_key(
        Path(config.checkpoint_dir).resolve(),
        Path(config.dataset.path).resolve(),
        config.dataset.seed,
    )
    tampered: dict[str, str] = {}

    async def forge_foreign() -> None:
        # Two groups under ids the learner never issued: another run's, and this run's key
        # at a position it never reached.
        while "sample" not in tampered:
            await asyncio.sleep(0.2)
        sample = ScoredRollout.model_validate_json(tampered["sample"])
        for tid in ("0123456789-0", f"{key}-1000000"):
            await bus.publish(SCORED, forged(sample, tid))

    def tamper(i: int, scored: ScoredRollout):
        tampered.setdefault("sample", scored.model_dump_json())
        kinds = {0: "future", 1: "nan", 2: "overflow"}
        if i not in kinds:
            return scored
        tampered[scored.task_id] = kinds[i]
        if i == 0:
            rollout = scored.rollout.model_copy(update={"policy_version": 10**6})
            return scored.model_copy(update={"rollout": rollout})
        return with_nan_reward(scored) if i == 1 else overflowing(scored)

    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played, tamper=tamper)
    )
    forger = asyncio.create_task(forge_foreign())
    try:
        assert await asyncio.wait_for(run(config), timeout=240) == 0
    finally:
        stop.set()
        await actor
        await forger

    lines = read_lines(tmp_path / "metrics.jsonl")
    steps, done = [r for r in lines if r["event"] == "step"], lines[-1]
    poisoned = {t for t, kind in tampered.items() if t != "sample"}
    trained = {t for r in steps for t in r["task_ids"]}
    assert len(poisoned) == 3 and not poisoned & trained
    assert done["groups_trained"] == 4 and done["steps"] == 2
    assert done["groups_foreign"] == 2 and done["steps_nonfinite"] == 1
    # The future version and the overflow are counted dead with their step; the NaN group's
    # place is freed when the learner reads its dead letter (once a second): by the end, or
    # it is still counted in flight.
    assert done["groups_dead"] in (2, 3)
    assert done["tasks_issued"] == accounted(done)

    errors = [letter.error for letter in await bus.dead_letters()]
    assert sum(e.startswith("foreign: ") for e in errors) == 2
    assert any(
        "behaviour policy_version 1000000 is newer than the learner's version" in e for e in errors
    )
    assert any("scores.0.reward: Input should be a finite number" in e for e in errors)
    assert any("non-finite loss in the update at policy version" in e for e in errors)
    # The update with the overflowing group applied nothing: two steps, two versions, and
    # a policy whose every weight is finite.
    assert [r["version"] for r in steps] == [1, 2]
    assert final_weights_finite(done["final_model"])


async def test_repeated_non_finite_updates_stop_the_learner_and_keep_the_last_checkpoint(
    nats_server, bus, tmp_path, tiny_model_dir
):
    # After the first step every group overflows: two updates in a row apply nothing and
    # `aha learner` exits 1 with one clear line; the checkpoint of step 1 stays the latest.
    config = learner_config(
        tmp_path,
        tiny_model_dir,
        nats_server.url,
        max_steps=5,
        final_model_dir=None,
        max_nonfinite_steps=2,
        max_staleness=0,
    )
    config_path = tmp_path / "aha.yaml"  # JSON is YAML
    config_path.write_text(json.dumps({"learner": config.model_dump(mode="json")}))

    def tamper(i: int, scored: ScoredRollout):
        return scored if i < config.batch else overflowing(scored)

    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played, tamper=tamper)
    )
    try:
        code, output = await learner_process(config_path, capture=True)
    finally:
        stop.set()
        await actor

    assert code == 1
    assert "2 updates in a row had a non-finite loss (learner.max_nonfinite_steps = 2)" in output
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step1"
    steps = [r for r in read_lines(tmp_path / "metrics.jsonl") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1]
    errors = [letter.error for letter in await bus.dead_letters()]
    assert sum("non-finite loss in the update" in e for e in errors) == 2 * config.batch
