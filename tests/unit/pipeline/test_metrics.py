"""R1's evaluation metrics (pipeline/metrics.py): values worked out by hand, and pass@k and
cons@k against brute-force enumeration of every k-subset for n <= 8."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from pipeline.metrics import (
    ScoredSample,
    cons_at_k,
    group_answers,
    group_correct,
    majority,
    mean_and_stderr,
    pass_at_k,
    reflects,
    sample_ks,
    summarize,
)
from rewarder.errors import Disqualified, VerifierError
from rewarder.rewards import math_equal


def test_pass_at_k_by_hand():
    # n = 4, c = 2: pass@1 = c/n = 1/2; pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6;
    # pass@4: every 4-subset is all four samples, two of them right = 1
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 2, 4) == 1.0
    # n = 5, c = 1, k = 2: 1 - C(4,2)/C(5,2) = 1 - 6/10 = 0.4
    assert pass_at_k(5, 1, 2) == pytest.approx(0.4)
    # nothing right: 0 for every k; all right: 1
    assert [pass_at_k(8, 0, k) for k in (1, 2, 8)] == [0.0, 0.0, 0.0]
    assert pass_at_k(8, 8, 1) == 1.0
    # n = 64, c = 1, k = 32: exactly 1/2 (half the subsets hold the one right sample), where
    # C(64, 32) ~ 1.8e18 overflows no float in the product form
    assert pass_at_k(64, 1, 32) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def brute_pass(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def brute_cons(groups: list[int | None], correct: list[bool | None], k: int) -> float:
    """Majority vote of every k-subset, as the metric defines it: most votes, a tie to the
    answer given first among all n samples; right when the group's answer is."""
    right = group_correct(groups, correct)
    subsets = list(itertools.combinations(range(len(groups)), k))
    wins = 0
    for s in subsets:
        votes = Counter(groups[i] for i in s if groups[i] is not None)
        if votes:
            winner = max(votes, key=lambda g: (votes[g], -g))
            wins += right[winner]
    return wins / len(subsets)


def test_pass_at_k_equals_enumeration_for_n_up_to_8():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass(correct, k)), (n, c, k)


def test_cons_at_k_by_hand_with_ties_and_undecided():
    # two votes for a right answer (0), one for a wrong one (1), one sample without an answer
    groups, correct = [0, 0, 1, None], [True, True, False, False]
    # k = 1: the right group's two samples win alone, the others do not: 2/4
    assert cons_at_k(groups, correct, 1) == pytest.approx(0.5)
    # k = 2, the 6 pairs: {0,1} 0; {0,2} and {1,2} tie 1-1, to group 0 (given first); {0,3},
    # {1,3} 0; {2,3} group 1 alone, wrong: 5/6
    assert cons_at_k(groups, correct, 2) == pytest.approx(5 / 6)
    assert cons_at_k(groups, correct, 4) == 1.0
    # a 2-2 tie over all four goes to the answer given first: wrong here
    assert cons_at_k([0, 1, 1, 0], [False, True, True, False], 4) == 0.0
    # the same votes, the right answer first: right
    assert cons_at_k([0, 1, 1, 0], [True, False, False, True], 4) == 1.0
    # an undecided sample (None) does not decide its group: the first decided one does
    assert group_correct([0, 0, 1], [None, True, False]) == {0: True, 1: False}
    assert cons_at_k([0, 0, 1], [None, True, False], 3) == 1.0
    # a group of undecided samples only is not right; nobody voting is not right
    assert cons_at_k([0, 0, 1], [None, None, True], 3) == 0.0
    assert cons_at_k([None, None], [False, False], 2) == 0.0


def test_cons_at_k_equals_enumeration_for_n_up_to_8():
    rng = random.Random(0)
    cases = [([0, 1, 1, 0, 2, None], [True, False, False, True, True, None])]
    for _ in range(300):
        n = rng.randint(1, 8)
        groups = [rng.choice([None, 0, 1, 2, 3][: rng.randint(2, 5)]) for _ in range(n)]
        # renumber by first appearance, as group_answers numbers them
        order = {g: i for i, g in enumerate(dict.fromkeys(g for g in groups if g is not None))}
        groups = [None if g is None else order[g] for g in groups]
        correct = [rng.choice([True, False, None]) for _ in range(n)]
        cases.append((groups, correct))
    for groups, correct in cases:
        for k in range(1, len(groups) + 1):
            assert cons_at_k(groups, correct, k) == pytest.approx(brute_cons(groups, correct, k)), (
                groups,
                correct,
                k,
            )


def test_majority_and_k_values():
    assert majority([1, 0, 1, 0, None]) == 0  # 2-2: the answer given first
    assert majority([0, 1, 1]) == 1
    assert majority([None]) is None
    assert sample_ks(1) == [1]
    assert sample_ks(4) == [1, 2, 4]
    assert sample_ks(6) == [1, 2, 4, 6]
    assert sample_ks(64) == [1, 2, 4, 8, 16, 32, 64]


def same_math(first: str, later: str) -> bool:
    try:
        return math_equal(first, later)
    except (VerifierError, Disqualified):
        return False


def test_equivalent_answers_are_one_vote_by_math_verify():
    # 1/2, 0.5 and \frac12 are one answer; 3 another; no answer does not vote
    answers = ["1/2", "0.5", r"\frac12", "3", None, r"\frac{1}{2}", "3.0"]
    assert group_answers(answers, same_math) == [0, 0, 0, 1, None, 0, 1]
    # so a right 1/2 given three ways outvotes a wrong 3 given twice, and each way alone
    # would have lost to it
    groups = group_answers(["3", "1/2", "3", "0.5", r"\frac12"], same_math)
    assert groups == [0, 1, 0, 1, 1]
    assert cons_at_k(groups, [False, True, False, True, True], 5) == 1.0
    assert group_answers(["3", "1/2", "3", "0.5", r"\frac12"], lambda a, b: False) == [
        0,
        1,
        0,
        2,
        3,
    ]


def test_reflection_counts_inside_the_thought_only():
    assert reflects("<think>2+2=5. Wait, that is wrong.</think> 4")
    assert reflects("<think>Let me RECHECK: 4</think> 4")
    assert not reflects("<think>2+2=4</think> Wait, 4")  # after the thought
    assert not reflects("Wait, 4")  # no thought at all
    assert not reflects("<think>we await the sum</think> 4")  # not the word
    assert reflects("<think>hmm, 4</think> 4", words=["hmm"])
    assert not reflects("<think>Wait</think>", words=[])


def test_pass_at_1_standard_error_over_problems():
    # per-problem pass@1 0.5, 0.25, 0: mean 0.25, sample sd sqrt((0.0625 + 0 + 0.0625) / 2)
    # = 0.25, standard error 0.25 / sqrt(3)
    mean, stderr = mean_and_stderr([0.5, 0.25, 0.0])
    assert mean == pytest.approx(0.25)
    assert stderr == pytest.approx(0.25 / math.sqrt(3))
    assert mean_and_stderr([0.5]) == (0.5, None)


def test_summarize_by_hand():
    # problem A: right (thinks, reflects, 10 tokens), wrong; problem B: undecided, truncated
    a = [
        ScoredSample("<think>wait, 1+1</think> 2", True, 1.0, 0, "stop", 10),
        ScoredSample("<think>x</think> 3", False, 0.0, 1, "stop", 4),
    ]
    b = [
        ScoredSample("7", None, None, 0, "stop", 2),
        ScoredSample("<think>and so on", False, 0.0, None, "length", 20),
    ]
    s = summarize([a, b])
    assert (s["problems"], s["k"], s["samples"]) == (2, 2, 4)
    # pass@1: A 1/2, B 0 -> 0.25 (the undecided sample is not right), se = sd(0.5, 0)/sqrt 2
    assert s["pass_at_1"] == pytest.approx(0.25)
    assert s["pass_at_1_stderr"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))
    assert s["pass_at_k"] == pytest.approx({"1": 0.25, "2": 0.5})
    # cons@2: A is a 1-1 tie to the right answer (given first): 1; B: one vote, undecided: 0
    assert s["cons_at_k"] == pytest.approx({"1": 0.25, "2": 0.5})
    assert (s["undecided"], s["truncated"], s["unrewarded"], s["no_answer"]) == (
        0.25,
        0.25,
        0.5,
        0.25,
    )
    # tokens: (10 + 4 + 2 + 20) / 4 = 9, median (4 + 10) / 2 = 7
    assert (s["mean_length"], s["median_length"], s["length_unit"]) == (9, 7, "tokens")
    # thoughts in characters: "wait, 1+1" 9, "x" 1, none 0, "and so on" 9 (unclosed)
    assert (s["mean_think_length"], s["median_think_length"]) == (4.75, 5)
    assert s["reflection_share"] == 0.25
    # one sample without a token count: lengths in characters
    b[0] = ScoredSample("7", None, None, 0)
    s = summarize([a, b])
    assert s["length_unit"] == "characters"
    assert s["mean_length"] == pytest.approx((26 + 18 + 1 + 16) / 4)
    # code (no votes): no cons@k and no answer share
    s = summarize([a, b], vote=False)
    assert s["cons_at_k"] is None and s["no_answer"] is None
    with pytest.raises(ValueError, match="same number"):
        summarize([a, a[:1]])
