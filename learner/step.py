"""What one GRPO step does with the scored groups it collected, as pure functions.

    scored groups ──refusal──▶ dead (dead-lettered by the learner: never trained)
                 ──judge──▶ trained | dropped_stale | dropped_zero_variance | dropped_no_reward
    trained groups ──advantages (reward=None left out)──▶ PolicyBatch ──▶ engine.train_step

A rollout sampled by policy version `b` and consumed at learner version `v` has staleness
`v − b`; groups with `v − b > max_staleness` are dropped (DESIGN.md, "The off-policy bound").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from learner.engine import PolicyBatch
from learner.grpo import group_advantages
from learner.logprobs import pad_batch
from learner.outcomes import Outcome
from protocol.messages import ScoredRollout


@dataclass(frozen=True)
class Group:
    """One scored group, reduced to what the step needs."""

    position: int
    """The task's dispatch position (see `learner.dispatcher`)."""
    task_id: str
    behaviour_version: int
    """b: the policy version that sampled every completion."""
    prompt_ids: np.ndarray
    """[P] the prompt tokens the actor conditioned on."""
    completions: list[np.ndarray]
    """G arrays of completion token ids."""
    logp_behaviour: list[np.ndarray]
    """G arrays of log μ per token."""
    rewards: list[float | None]
    """Total reward per completion; None where a verifier could not decide."""
    components: list[dict[str, float | None]]
    temperature: float

    @classmethod
    def of(cls, scored: ScoredRollout, position: int) -> Group:
        rollout = scored.rollout
        return cls(
            position=position,
            task_id=rollout.task.task_id,
            behaviour_version=rollout.policy_version,
            prompt_ids=rollout.prompt_token_ids,
            completions=[s.token_ids for s in rollout.samples],
            logp_behaviour=[s.logprobs for s in rollout.samples],
            rewards=[s.reward for s in scored.scores],
            components=[s.components for s in scored.scores],
            temperature=rollout.task.sampling.temperature,
        )


def refusal(scored: ScoredRollout, version: int, vocab_size: int) -> str | None:
    """Why a scored group of an issued task must not be trained on, or None.

    The behaviour version cannot be newer than the learner's own (no actor has those
    weights), every token must be one the policy embeds, and no completion may be longer
    than the task allowed.
    """
    rollout = scored.rollout
    if rollout.policy_version > version:
        return (
            f"behaviour policy_version {rollout.policy_version} is newer than the learner's "
            f"version {version}"
        )
    for name, ids in [("prompt", rollout.prompt_token_ids)] + [
        (f"completion {j}", s.token_ids) for j, s in enumerate(rollout.samples)
    ]:
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            return f"{name}: token id {bad} is outside the policy's vocabulary of {vocab_size}"
    issued_ids = rollout.task.prompt_token_ids
    if issued_ids is not None and not np.array_equal(rollout.prompt_token_ids, issued_ids):
        return "the rollout's prompt tokens are not its task's"
    max_tokens = rollout.task.sampling.max_tokens
    for j, sample in enumerate(rollout.samples):
        if len(sample.token_ids) > max_tokens:
            n = len(sample.token_ids)
            return f"completion {j} has {n} tokens, more than max_tokens {max_tokens}"
    return None


def staleness(version: int, behaviour_version: int) -> int:
    """`v − b`: how many updates the learner has taken since the group was sampled."""
    return version - behaviour_version


def judge(group: Group, version: int, max_staleness: int, drop_zero_variance: bool) -> Outcome:
    """Whether a group is trained on at learner version `version`, or why it is dropped.

    Stale groups (`v − b > max_staleness`) are always dropped; a group where no completion got
    a reward carries nothing to learn; one whose rewards are all equal has zero advantage and
    is dropped only when `drop_zero_variance` (DAPO's dynamic sampling).
    """
    if staleness(version, group.behaviour_version) > max_staleness:
        return Outcome.DROPPED_STALE
    rewards = [r for r in group.rewards if r is not None]
    if not rewards:
        return Outcome.DROPPED_NO_REWARD
    if drop_zero_variance and max(rewards) == min(rewards):
        return Outcome.DROPPED_ZERO_VARIANCE
    return Outcome.TRAINED


def advantages(rewards: list[float | None], scale: str) -> list[float | None]:
    """Group-relative advantage per completion; None for completions without a reward.

    Only completions with a reward form the group (`learner.grpo.group_advantages` over them),
    so a failed verifier neither counts as 0 nor shifts the others' baseline. One rewarded
    completion alone has advantage 0.
    """
    index = [i for i, r in enumerate(rewards) if r is not None]
    out: list[float | None] = [None] * len(rewards)
    if len(index) == 1:
        out[index[0]] = 0.0
    elif index:
        r = torch.tensor([rewards[i] for i in index], dtype=torch.float64)  # [k]
        for i, a in zip(index, group_advantages(r, len(index), scale).tolist(), strict=True):
            out[i] = a
    return out


def shuffle_rewards(groups: list[Group], rng) -> list[Group]:
    """The control experiment: the batch's rewards permuted across all its completions
    (None stays where it is), so a reward no longer says anything about its completion."""
    slots = [(i, j) for i, g in enumerate(groups) for j, r in enumerate(g.rewards) if r is not None]
    values = [groups[i].rewards[j] for i, j in slots]
    rng.shuffle(values)
    rewards = [list(g.rewards) for g in groups]
    for (i, j), value in zip(slots, values, strict=True):
        rewards[i][j] = value
    return [dataclasses.replace(g, rewards=r) for g, r in zip(groups, rewards, strict=True)]


def batch_owners(groups: list[Group]) -> list[int]:
    """For each row of `build_batch(groups, …)`, the index of its group in `groups`."""
    return [i for i, _, _, _ in _rows(groups, "none")]


def _rows(groups: list[Group], scale: str):
    """(group index, completion ids, log μ, advantage) of every rewarded, non-empty completion."""
    for i, g in enumerate(groups):
        for ids, logp, a in zip(
            g.completions, g.logp_behaviour, advantages(g.rewards, scale), strict=True
        ):
            if a is not None and len(ids) > 0:
                yield i, ids, logp, a


def build_batch(groups: list[Group], scale: str, pad_id: int = 0) -> PolicyBatch:
    """The `PolicyBatch` of every rewarded, non-empty completion of `groups`."""
    temperatures = {g.temperature for g in groups}
    if len(temperatures) != 1:
        raise ValueError(f"groups sampled at different temperatures {sorted(temperatures)}")
    prompts, completions, logps, adv = [], [], [], []
    for i, ids, logp, a in _rows(groups, scale):
        prompts.append(groups[i].prompt_ids.tolist())
        completions.append(ids.tolist())
        logps.append(logp)
        adv.append(a)
    if not completions:
        raise ValueError("no rewarded completion in the batch")
    prompt_ids, prompt_mask, completion_ids, completion_mask = pad_batch(
        prompts, completions, pad_id
    )
    logp_behaviour = torch.zeros(completion_ids.shape, dtype=torch.float32)  # [N, T]
    for n, logp in enumerate(logps):
        logp_behaviour[n, : len(logp)] = torch.tensor(np.asarray(logp), dtype=torch.float32)
    return PolicyBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        adv=torch.tensor(adv, dtype=torch.float32),  # [N]
        logp_behaviour=logp_behaviour,
        temperature=temperatures.pop(),
    )


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def sample_stats(groups: list[Group]) -> dict:
    """What the sampled completions look like: reward mean/std (total and per component),
    accuracy (the mean of every component whose name starts with "accuracy"), length."""
    rewards = [r for g in groups for r in g.rewards if r is not None]
    by_component: dict[str, list[float]] = {}
    for g in groups:
        for components in g.components:
            for name, value in components.items():
                if value is not None:
                    by_component.setdefault(name, []).append(value)
    accuracy = [v for name, vs in by_component.items() if name.startswith("accuracy") for v in vs]
    lengths = [len(ids) for g in groups for ids in g.completions]
    reward, reward_std = _mean_std(rewards)
    return {
        "reward": reward,
        "reward_std": reward_std,
        "components": {name: _mean_std(vs) for name, vs in sorted(by_component.items())},
        "accuracy": sum(accuracy) / len(accuracy) if accuracy else None,
        "response_length": sum(lengths) / len(lengths) if lengths else None,
    }


def staleness_stats(groups: list[Group], version: int) -> dict:
    """Staleness of the trained groups and the behaviour versions they came from."""
    ages = [staleness(version, g.behaviour_version) for g in groups]
    return {
        "staleness": ages,
        "staleness_mean": sum(ages) / len(ages) if ages else None,
        "staleness_max": max(ages) if ages else None,
        "policy_versions": sorted({g.behaviour_version for g in groups}),
    }
