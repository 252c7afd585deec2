"""The step's pure parts: the staleness filter, zero-variance drop, advantages without the
rewardless completions, the PolicyBatch layout and the sample statistics."""

import math

import numpy as np
import pytest
import torch

from learner.outcomes import Outcome
from learner.step import Group, advantages, build_batch, judge, sample_stats, staleness_stats
from protocol.messages import Sampling


def group(rewards, version=0, position=0, lengths=None, temperature=1.0, components=None):
    lengths = lengths or [2] * len(rewards)
    return Group(
        position=position,
        task_id=f"run-{position}",
        behaviour_version=version,
        prompt_ids=np.array([5, 6, 7], dtype=np.int32),
        completions=[np.arange(1, n + 1, dtype=np.int32) for n in lengths],
        logp_behaviour=[np.full(n, -0.5, dtype=np.float32) for n in lengths],
        rewards=list(rewards),
        components=components or [{"accuracy_math": r, "format_think": 1.0} for r in rewards],
        temperature=temperature,
    )


def test_staleness_filter_keeps_v_minus_b_up_to_max_staleness():
    # learner at v = 5, η = 2: b = 3 is 2 versions old (kept), b = 2 is 3 old (dropped)
    assert judge(group([0.0, 1.0], version=3), 5, 2, False) == Outcome.TRAINED
    assert judge(group([0.0, 1.0], version=2), 5, 2, False) == Outcome.DROPPED_STALE
    assert judge(group([0.0, 1.0], version=5), 5, 0, False) == Outcome.TRAINED
    assert judge(group([0.0, 1.0], version=4), 5, 0, False) == Outcome.DROPPED_STALE


def test_zero_variance_groups_are_dropped_only_when_configured():
    equal = group([1.0, 1.0, None])  # the None does not make the rewards differ
    assert judge(equal, 0, 2, drop_zero_variance=True) == Outcome.DROPPED_ZERO_VARIANCE
    assert judge(equal, 0, 2, drop_zero_variance=False) == Outcome.TRAINED
    assert judge(group([0.0, 1.0]), 0, 2, drop_zero_variance=True) == Outcome.TRAINED
    assert judge(group([None, None]), 0, 2, drop_zero_variance=False) == Outcome.DROPPED_NO_REWARD
    # staleness is judged first: a stale all-equal group counts as stale
    assert judge(group([1.0, 1.0], version=0), 9, 2, True) == Outcome.DROPPED_STALE


def test_advantages_leave_out_completions_without_reward():
    # rewards [1, None, 0, 0.5]: the group is [1, 0, 0.5], mean 0.5,
    # sample std sqrt(((0.5)² + (0.5)² + 0²) / 2) = 0.5 -> A = [1, -1, 0]
    adv = advantages([1.0, None, 0.0, 0.5], "std")
    assert adv[1] is None
    assert adv[0] == pytest.approx(1.0, abs=1e-5)
    assert adv[2] == pytest.approx(-1.0, abs=1e-5)
    assert adv[3] == pytest.approx(0.0, abs=1e-6)
    # Dr. GRPO: no scaling, r − mean = [0.5, −0.5, 0]
    assert advantages([1.0, None, 0.0, 0.5], "none") == pytest.approx([0.5, None, -0.5, 0.0])
    assert advantages([None, 0.7, None], "std") == [
        None,
        0.0,
        None,
    ]  # one reward: nothing to compare
    assert advantages([None, None], "std") == [None, None]
    assert advantages([2.0, 2.0], "std") == [0.0, 0.0]  # all equal: zero advantage


def test_build_batch_lays_out_rewarded_completions():
    g0 = group([1.0, 0.0], lengths=[3, 1], position=0)
    g1 = group([None, 1.0, 0.0], lengths=[2, 2, 0], position=1)  # None and the empty one left out
    batch = build_batch([g0, g1], "std")
    assert len(batch) == 3  # g0's two completions + g1's second
    # rewards [1, 0] -> mean 0.5, sample std sqrt(0.5) -> A = ±0.5/0.7071 = ±0.7071;
    # g1: rewarded completions [1.0, 0.0] (the empty one still counts for the baseline) -> ±0.7071
    assert batch.adv.tolist() == pytest.approx(
        [math.sqrt(0.5), -math.sqrt(0.5), math.sqrt(0.5)], abs=1e-5
    )
    assert batch.completion_ids.tolist() == [[1, 2, 3], [1, 0, 0], [1, 2, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.prompt_ids.tolist() == [[5, 6, 7]] * 3
    assert torch.equal(
        batch.logp_behaviour, torch.tensor([[-0.5] * 3, [-0.5, 0, 0], [-0.5, -0.5, 0]])
    )
    assert batch.temperature == 1.0


def test_build_batch_refuses_mixed_temperatures():
    with pytest.raises(ValueError, match="temperatures"):
        build_batch([group([0.0, 1.0]), group([0.0, 1.0], temperature=0.7)], "std")


def test_sample_and_staleness_stats():
    g0 = group(
        [1.1, 0.1],
        version=3,
        lengths=[4, 2],
        components=[
            {"accuracy_gsm8k": 1.0, "format_think": 1.0},
            {"accuracy_gsm8k": 0.0, "format_think": 1.0},
        ],
    )
    g1 = group(
        [None, 0.0],
        version=1,
        lengths=[6, 4],
        components=[
            {"accuracy_gsm8k": None, "format_think": 0.0},
            {"accuracy_gsm8k": 0.0, "format_think": 0.0},
        ],
    )
    stats = sample_stats([g0, g1])
    # rewards 1.1, 0.1, 0.0: mean 0.4; accuracy over the 3 decided values 1, 0, 0 = 1/3
    assert stats["reward"] == pytest.approx(0.4)
    assert stats["accuracy"] == pytest.approx(1 / 3)
    assert stats["response_length"] == 4.0  # (4 + 2 + 6 + 4) / 4
    assert stats["components"]["format_think"] == pytest.approx((0.5, 0.5))
    ages = staleness_stats([g0, g1], version=4)  # 4 − 3 = 1, 4 − 1 = 3
    assert ages == {
        "staleness": [1, 3],
        "staleness_mean": 2.0,
        "staleness_max": 3,
        "policy_versions": [1, 3],
    }


def test_shuffled_rewards_keep_the_batch_and_lose_the_link():
    from learner.step import shuffle_rewards

    groups = [group([1.0, 0.0, 0.0]), group([None, 1.0, 0.5])]

    class Reverse:  # a deterministic "shuffle": reverses the 5 rewards
        def shuffle(self, values):
            values.reverse()

    out = shuffle_rewards(groups, Reverse())
    # rewards in slot order 1, 0, 0, 1, .5 reversed -> .5, 1, 0, 0, 1; None stays put
    assert [g.rewards for g in out] == [[0.5, 1.0, 0.0], [None, 0.0, 1.0]]
    assert [g.rewards for g in groups] == [[1.0, 0.0, 0.0], [None, 1.0, 0.5]]  # inputs intact
    assert all(a.completions is b.completions for a, b in zip(out, groups, strict=True))


def test_groups_that_cannot_be_trained_on_are_refused_with_the_reason():
    from learner.step import refusal
    from tests.helpers import make_rollout, make_scored, make_task

    def scored(version=3, tokens=4, **task):
        return make_scored(make_rollout(make_task(**task), tokens=tokens, version=version))

    assert refusal(scored(version=3), version=3, vocab_size=48) is None
    assert refusal(scored(version=10**6), 3, 48) == (
        "behaviour policy_version 1000000 is newer than the learner's version 3"
    )
    # make_rollout's completion j holds ids j .. j + tokens - 1: completion 1 reaches 48
    assert refusal(scored(tokens=48), 3, 48) == (
        "completion 1: token id 48 is outside the policy's vocabulary of 48"
    )
    long = scored(tokens=5, sampling=Sampling(max_tokens=4))
    assert refusal(long, 3, 48) == "completion 0 has 5 tokens, more than max_tokens 4"
    other_prompt = scored(prompt_token_ids=[7, 7])  # the rollout conditioned on [1, 2, 3]
    assert refusal(other_prompt, 3, 48) == "the rollout's prompt tokens are not its task's"


def test_batch_owners_map_rows_to_groups():
    from learner.step import batch_owners

    # group 0: both rewarded; group 1: only its second completion has a reward
    groups = [group([0.0, 1.0]), group([None, 1.0])]
    assert batch_owners(groups) == [0, 0, 1]
    assert len(build_batch(groups, "std")) == 3
