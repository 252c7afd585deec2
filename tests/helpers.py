"""Message builders shared by tests."""

from __future__ import annotations

import numpy as np

from protocol.messages import Rollout, Sample, Score, ScoredRollout, Task


def make_task(i: int = 0, group_size: int = 2, **kw) -> Task:
    return Task(
        task_id=f"task-{i}",
        prompt_id=f"prompt-{i}",
        prompt=f"Q:{i}+1=",
        reference=str(i + 1),
        rewards={"accuracy_math": 1.0, "format_think": 0.1},
        group_size=group_size,
        issued_version=0,
        **kw,
    )


def make_rollout(task: Task, tokens: int = 4, version: int = 0) -> Rollout:
    samples = [
        Sample(
            token_ids=np.arange(tokens, dtype=np.int32) + j,
            logprobs=-np.linspace(0.1, 1.0, tokens, dtype=np.float32),
            text=f"<think>{j}</think><answer>{task.reference}</answer>",
            finish_reason="stop",
        )
        for j in range(task.group_size)
    ]
    return Rollout(
        task=task,
        policy_version=version,
        actor_id="actor-test",
        prompt_token_ids=np.array([1, 2, 3], dtype=np.int32),
        samples=samples,
    )


def make_scored(rollout: Rollout) -> ScoredRollout:
    scores = [Score(reward=1.0, components={"accuracy_math": 1.0}) for _ in rollout.samples]
    return ScoredRollout(rollout=rollout, scores=scores, rewarder_id="rewarder-test")
