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


async def check_stop_strings(engine, tokenizer, prompt_text: str) -> None:
    """Any engine: a stop string cuts the text before it and keeps the token that completed
    it as the last one (the learner trains on it), as vLLM does; otherwise the group ends
    on EOS."""
    from protocol.messages import Sampling

    prompt = tokenizer(prompt_text).input_ids
    free = await engine.generate(prompt, Sampling(max_tokens=32, seed=1), n=8)
    # Pick a character the untrained model does produce, then stop on it.
    stop = next(s.text[2] for s in free.samples if len(s.text) > 3)

    group = await engine.generate(prompt, Sampling(max_tokens=32, seed=1, stop=[stop]), n=8)

    stopped = [s for s in group.samples if s.finish_reason == "stop"]
    assert stopped
    for s in stopped:
        assert stop not in s.text
        full = tokenizer.decode(s.token_ids, skip_special_tokens=True)
        if stop in full:  # else it ended on EOS
            # The token that completed the stop string is the last; it may spell more, e.g.
            # "<think>" for the stop string "<".
            assert s.text == full[: full.index(stop)]
            assert stop not in tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)
        else:
            assert s.token_ids[-1] == tokenizer.eos_token_id


def processes_with(marker: str) -> set[int]:
    """Pids of the live processes whose environment holds `AHA_PART=<marker>` (every process
    of a part that `deploy.supervisor` started, its children included)."""
    from pathlib import Path

    from deploy.supervisor import PART_ENV

    found = set()
    needle = f"{PART_ENV}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.add(int(entry.name))
    return found
