"""`aha rewarder` against a real nats-server: a rollout in, its scored rollout out."""

from __future__ import annotations

import asyncio

import pytest

from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.depth import queue_depth
from protocol.names import ROLLOUTS, SCORED, scored_stage
from protocol.server import NatsServer
from protocol.stage import StageConsumer
from rewarder.config import RewarderConfig
from rewarder.pool import VerifierPool
from rewarder.service import run, score_rollout
from tests.helpers import make_rollout, make_task


def rollout_with(texts: list[str], reference="2", rewards=None):
    task = make_task(1, group_size=len(texts))
    task = task.model_copy(
        update={
            "reference": reference,
            "rewards": rewards or {"accuracy_math": 1.0, "format_think": 0.1},
        }
    )
    rollout = make_rollout(task)
    samples = [
        s.model_copy(update={"text": t}) for s, t in zip(rollout.samples, texts, strict=True)
    ]
    return rollout.model_copy(update={"samples": samples})


async def test_score_rollout_scores_every_completion_of_the_group():
    rollout = rollout_with(
        [
            r"<think>1+1</think> \boxed{2}",
            r"<think>1+1</think> \boxed{3}",
            r"\boxed{2}",
            "<think>1+1",
        ]
    )
    with VerifierPool(workers=2, timeout_s=20) as pool:
        scored = await score_rollout(pool, rollout, "r-test")
    # 1.0*acc + 0.1*format: right+format 1.1, wrong+format 0.1, right w/o format 1.0, unclosed 0
    assert [s.reward for s in scored.scores] == pytest.approx([1.1, 0.1, 1.0, 0.0])
    assert scored.rewarder_id == "r-test" and scored.rollout.task_id == rollout.task_id


async def test_a_zero_by_rule_carries_its_reason_on_the_wire():
    """A hedge (`x = 6 = 5`) scores 0, not no reward, and the scored group says why: the reason
    travels in the message and is counted per reward."""
    from protocol.codec import decode, encode
    from protocol.messages import ScoredRollout
    from rewarder.service import DISQUALIFIED

    before = DISQUALIFIED.labels("accuracy_math")._value.get()
    rollout = rollout_with(
        [r"<think>a</think> \boxed{x = 6 = 5}", r"<think>a</think> \boxed{5}"], "5"
    )
    with VerifierPool(workers=2, timeout_s=20) as pool:
        scored = await score_rollout(pool, rollout, "r-test")
    hedge, right = decode(encode(scored), ScoredRollout).scores
    assert hedge.reward == pytest.approx(0.1) and hedge.error is None
    assert hedge.note.startswith("accuracy_math: ") and "not all equal" in hedge.note
    assert right.reward == pytest.approx(1.1) and right.note is None
    assert DISQUALIFIED.labels("accuracy_math")._value.get() == before + 1


async def test_the_rewarder_process_consumes_rollouts_and_publishes_scores(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        config = RewarderConfig(workers=2, bus=BusConfig(url=server.url), rewarder_id="r-1")
        bus = await Bus.connect(config.bus, name="test")
        try:
            rollout = rollout_with([r"<think>a</think> \boxed{2}", r"\boxed{5}"], reference="")
            await bus.publish(ROLLOUTS, rollout)
            assert await asyncio.wait_for(run(config, asyncio.Event(), max_messages=1), 60) == 0

            [delivery] = await StageConsumer(bus, SCORED).fetch(1, timeout=5)
            scored = delivery.message
            # the reference "" does not parse: no reward for either, with the reason, never 0
            assert [s.reward for s in scored.scores] == [None, None]
            assert scored.scores[0].components == {"accuracy_math": None, "format_think": 1.0}
            assert "could not parse the reference" in scored.scores[1].error
            assert scored.rewarder_id == "r-1"
            await delivery.ack_sync()
            depth = await queue_depth(bus.js)
            assert depth["rollouts"].messages == 0  # acked after the scored rollout was published
        finally:
            await bus.close()


async def test_each_job_gets_its_own_scored_groups_with_their_answers(tmp_path):
    """Two jobs' rollouts through one rewarder: each group reaches its job's consumer only (the
    learner's `train` never sees the eval's), and every score names the answer it votes with;
    the undecided one (a reference that does not parse) stays apart from the wrong one (0)."""
    from protocol.streams import ensure_job_consumer

    with NatsServer(tmp_path / "nats") as server:
        config = RewarderConfig(workers=2, bus=BusConfig(url=server.url), rewarder_id="r-1")
        bus = await Bus.connect(config.bus, name="test")
        try:
            await ensure_job_consumer(bus.js, config.bus, "eval-1")
            train = rollout_with([r"<think>a</think> \boxed{2}", r"<think>a</think> \boxed{3}"])
            other = rollout_with([r"\boxed{ \frac{1}{2} }", "no answer"], reference="")
            task = other.task.model_copy(update={"task_id": "eval-task", "job": "eval-1"})
            other = other.model_copy(update={"task": task})
            await bus.publish(ROLLOUTS, train)
            await bus.publish(ROLLOUTS, other)
            assert await asyncio.wait_for(run(config, asyncio.Event(), max_messages=2), 60) == 0

            [learner] = await StageConsumer(bus, SCORED).fetch(5, timeout=2)
            assert learner.message.task_id == train.task_id
            assert [(s.reward, s.answer) for s in learner.message.scores] == [
                (pytest.approx(1.1), "2"),
                (pytest.approx(0.1), "3"),
            ]
            [evaluated] = await StageConsumer(bus, scored_stage("eval-1")).fetch(5, timeout=2)
            assert evaluated.msg.subject == "aha.scored.eval-1"
            undecided, none = evaluated.message.scores
            assert undecided.reward is None and "could not parse" in undecided.error
            assert undecided.answer == r"\frac{1}{2}" and none.answer is None
            for delivery in (learner, evaluated):
                await delivery.ack_sync()
        finally:
            await bus.close()
