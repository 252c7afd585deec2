"""R1's evaluation metrics over scored samples (DeepSeek-R1, arXiv:2501.12948, section 3.1).

Pure functions. A problem has `n` samples; sample `i` is correct when the benchmark's accuracy
reward gave it 1, and *undecided* when its verifier could not decide (reward null): an
undecided sample counts as not correct everywhere, and the `undecided` share says how many
there were.

- pass@1 = the mean over problems of c/n (R1's "mean correctness over k samples"), with its
  standard error over problems;
- pass@k = 1 − C(n−c, k)/C(n, k), the chance that k of the n samples drawn without
  replacement hold a correct one (Chen et al. 2021, arXiv:2107.03374, unbiased estimator);
- cons@k = the chance that the majority vote of k of the n samples drawn without replacement
  is a correct answer, computed exactly (not sampled). Equivalent answers are one vote
  (`group_answers`); a sample without an answer does not vote; ties go to the answer given
  first among all n samples; the vote's answer is as correct as the first decided sample that
  gave it; no vote at all is not correct. cons@n is R1's cons@64 when n = 64.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rewarder.rewards import split_think

REFLECTION_WORDS = ("wait", "recheck", "re-check", "double-check", "re-evaluate", "reconsider")
"""Words that mark a thought going back over itself (R1's "aha moment": "Wait, wait. Wait.
That's an aha moment I can flag here"), matched as whole words, any case."""
TRUNCATED = "length"
"""The finish reason of a completion cut at the token limit (vLLM's and HF's name)."""

H = TypeVar("H", bound=Hashable)


def sample_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, … below n, then n itself (n = 6: [1, 2, 4, 6])."""
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k), as the product 1 − Π_{i=n−c+1}^{n} (1 − k/i) (no huge binomials).

    n = 4, c = 2, k = 2: 1 − C(2,2)/C(4,2) = 1 − 1/6 = 5/6; the product: 1 − (1 − 2/3)(1 − 2/4)
    = 1 − (1/3)(1/2) = 5/6.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error, sample standard deviation / √m (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def group_answers(answers: Sequence[H | None], same: Callable[[H, H], bool]) -> list[int | None]:
    """The vote group of each answer: groups are numbered 0, 1, … in order of first appearance;
    None for no answer. An answer joins the first group whose first answer is equal to it or
    `same(first, answer)` (the earlier answer first: Math-Verify's check is asymmetric)."""
    firsts: list[H] = []
    groups: list[int | None] = []
    for answer in answers:
        if answer is None:
            groups.append(None)
            continue
        for number, first in enumerate(firsts):
            if first == answer or same(first, answer):
                groups.append(number)
                break
        else:
            firsts.append(answer)
            groups.append(len(firsts) - 1)
    return groups


def group_correct(groups: Sequence[int | None], correct: Sequence[bool | None]) -> dict[int, bool]:
    """Whether each group's answer is right: the verdict of its first decided sample (`correct`
    None = undecided); a group of undecided samples only is not right."""
    verdict: dict[int, bool] = {}
    for group, ok in zip(groups, correct, strict=True):
        if group is None:
            continue
        if group not in verdict or (verdict[group] is None and ok is not None):
            verdict[group] = ok  # type: ignore[assignment]
    return {g: bool(ok) for g, ok in verdict.items()}


def majority(groups: Iterable[int | None]) -> int | None:
    """The winning group of a vote: most votes, a tie to the lowest group number (the answer
    given first); None when nobody voted."""
    votes = Counter(g for g in groups if g is not None)
    if not votes:
        return None
    return min(votes, key=lambda g: (-votes[g], g))


def _times(a: list[int], b: list[int], degree: int) -> list[int]:
    """The product of two polynomials (coefficient lists), cut above `degree`."""
    out = [0] * min(len(a) + len(b) - 1, degree + 1)
    for i, x in enumerate(a[: degree + 1]):
        if x:
            for j, y in enumerate(b[: degree + 1 - i]):
                out[i + j] += x * y
    return out


def cons_at_k(groups: Sequence[int | None], correct: Sequence[bool | None], k: int) -> float:
    """The chance that the majority vote (`majority`) of k samples drawn without replacement
    from these n is a right answer (`group_correct`), counted exactly over all C(n, k) subsets.

    A subset where right group j wins with v votes takes v of j's s_j samples, fewer than v
    from each group numbered below j (a tie would go to it), at most v from each group above,
    and any number of the samples without an answer: the count is C(s_j, v) times the
    coefficient of x^(k−v) in Π_{i<j} Σ_{a<v} C(s_i, a) x^a · Π_{i>j} Σ_{a≤v} C(s_i, a) x^a ·
    (1 + x)^abstain.
    """
    n = len(groups)
    if not 1 <= k <= n:
        raise ValueError(f"cons@k needs 1 <= k <= n, got n={n}, k={k}")
    sizes = Counter(g for g in groups if g is not None)
    abstain = n - sum(sizes.values())
    right = group_correct(groups, correct)
    wins = 0
    for j in sorted(sizes):
        if not right[j]:
            continue
        for v in range(1, min(sizes[j], k) + 1):
            rest = k - v
            ways = [math.comb(abstain, a) for a in range(abstain + 1)]
            for i in sizes:
                if i != j:
                    cap = min(v - 1 if i < j else v, sizes[i])
                    ways = _times(ways, [math.comb(sizes[i], a) for a in range(cap + 1)], rest)
            if rest < len(ways):
                wins += math.comb(sizes[j], v) * ways[rest]
    return wins / math.comb(n, k)


def reflects(text: str, words: Sequence[str] = REFLECTION_WORDS) -> bool:
    """Whether the thought (inside `<think>`, see `rewarder.rewards.split_think`) uses one of
    `words` as a whole word, any case; a completion without a thought does not reflect."""
    thought, _ = split_think(text)
    if not thought or not words:
        return False
    pattern = r"(?<![\w-])(?:" + "|".join(map(re.escape, words)) + r")(?![\w-])"
    return re.search(pattern, thought, re.IGNORECASE) is not None


@dataclass(frozen=True)
class ScoredSample:
    """What the metrics need of one scored sample."""

    text: str
    correct: bool | None
    """The accuracy reward gave 1; None when its verifier could not decide (reward null)."""
    reward: float | None
    """The weighted total (None: undecided)."""
    group: int | None = None
    """Its vote group in its problem (`group_answers`); None: no answer."""
    finish_reason: str | None = None
    n_tokens: int | None = None


def summarize(
    problems: Sequence[Sequence[ScoredSample]],
    vote: bool = True,
    words: Sequence[str] = REFLECTION_WORDS,
) -> dict:
    """Every metric of one benchmark; every problem has the same number n of samples.

    Lengths are in tokens when every sample has `n_tokens`, else in characters
    (`length_unit`); thought lengths are always characters (a samples file does not count the
    thought's tokens), 0 for a completion without one. Without `vote` (code: no answer to vote
    on) `cons_at_k` is None.
    """
    if not problems:
        raise ValueError("no problems to summarize")
    n = len(problems[0])
    if n == 0 or any(len(p) != n for p in problems):
        raise ValueError("every problem needs the same number (at least 1) of samples")
    samples = [s for p in problems for s in p]
    ks = sample_ks(n)
    c = [sum(s.correct is True for s in p) for p in problems]
    pass_1, stderr = mean_and_stderr([ci / n for ci in c])
    pass_k = {str(k): statistics.fmean(pass_at_k(n, ci, k) for ci in c) for k in ks}
    cons_k = None
    if vote:
        cons_k = {
            str(k): statistics.fmean(
                cons_at_k([s.group for s in p], [s.correct for s in p], k) for p in problems
            )
            for k in ks
        }
    in_tokens = all(s.n_tokens is not None for s in samples)
    lengths = [s.n_tokens if in_tokens else len(s.text) for s in samples]
    thoughts = [len(split_think(s.text)[0] or "") for s in samples]

    def share(test: Callable[[ScoredSample], bool]) -> float:
        return sum(map(test, samples)) / len(samples)

    return {
        "problems": len(problems),
        "k": n,
        "samples": len(samples),
        "pass_at_1": pass_1,
        "pass_at_1_stderr": stderr,
        "pass_at_k": pass_k,
        "cons_at_k": cons_k,
        "undecided": share(lambda s: s.reward is None),
        "truncated": share(lambda s: s.finish_reason == TRUNCATED),
        "unrewarded": share(lambda s: s.reward == 0),
        "no_answer": share(lambda s: s.group is None) if vote else None,
        "mean_length": statistics.fmean(lengths),
        "median_length": statistics.median(lengths),
        "length_unit": "tokens" if in_tokens else "characters",
        "mean_think_length": statistics.fmean(thoughts),
        "median_think_length": statistics.median(thoughts),
        "think_length_unit": "characters",
        "reflection_share": share(lambda s: reflects(s.text, words)),
    }
