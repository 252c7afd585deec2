"""Real data (tests/data, see its README): each dataset's own reference solutions must score
as right, through the same pool the rewarder uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewarder.pool import Job, VerifierPool
from rewarder.rewards import accuracy_gsm8k
from rewarder.sandbox import isolation

DATA = Path(__file__).parents[2] / "data"


def rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=60.0) as pool:
        yield pool


@pytest.mark.slow
def test_every_math500_solution_matches_its_own_answer(pool):
    math500 = rows("math500_test.jsonl")
    assert len(math500) == 500
    scores = pool.map([Job(r["solution"], r["answer"], {"accuracy_math": 1.0}) for r in math500])
    misses = [
        (r["unique_id"], r["answer"], s.reward, s.error)
        for r, s in zip(math500, scores, strict=True)
        if s.reward != 1.0
    ]
    print(f"MATH-500: {500 - len(misses)}/500 solutions verified; misses:")
    for miss in misses:
        print("  ", *miss)
    assert len(misses) <= 5, misses  # >= 99 %


@pytest.mark.slow
def test_math500_solutions_do_not_match_other_problems_answers(pool):
    """The verifier is not trivially true: row i's solution against row i+1's answer."""
    math500 = rows("math500_test.jsonl")
    shifted = [
        Job(a["solution"], b["answer"], {"accuracy_math": 1.0})
        for a, b in zip(math500[:-1], math500[1:], strict=True)  # row i and row i+1
    ]
    scores = pool.map(shifted)
    hits = [
        (a["unique_id"], b["answer"])
        for a, b, s in zip(math500[:-1], math500[1:], scores, strict=True)
        if s.reward == 1.0
    ]
    print(f"MATH-500 shifted: {len(hits)}/499 coincidental matches: {hits}")
    assert len(hits) <= 5  # neighbouring problems can share an answer (2 and 2), not more


def test_every_gsm8k_answer_text_matches_its_own_final_number():
    gsm8k = rows("gsm8k_test.jsonl")
    assert len(gsm8k) == 1319
    misses = [r["answer"][-60:] for r in gsm8k if accuracy_gsm8k(r["answer"], r["answer"]) != 1.0]
    assert misses == []
    # and the text without its "#### 72" line still ends in the right number: the last number
    # of the worked solution is the result of its last calculation
    wrong = [
        r
        for r in gsm8k[:50]
        if accuracy_gsm8k(r["answer"].rsplit("####", 1)[0], r["answer"]) != 1.0
    ]
    assert len(wrong) <= 5


@pytest.mark.slow
@pytest.mark.skipif(
    isolation() != "namespaces", reason="runs model-style code: wants the full sandbox"
)
def test_humaneval_canonical_solutions_pass_and_broken_bodies_and_hacks_fail(pool):
    humaneval = rows("humaneval.jsonl")
    assert len(humaneval) == 164

    def jobs(completions):
        return [
            Job(
                completion,
                {"entry_point": r["entry_point"], "test": r["test"], "prompt": r["prompt"]},
                {"code_tests": 1.0},
            )
            for r, completion in zip(humaneval, completions, strict=True)
        ]

    good = jobs(f"```python\n{r['prompt']}{r['canonical_solution']}```" for r in humaneval)
    broken = jobs(f"{r['prompt']}    return None\n" for r in humaneval)
    # the two lines that scored 1.0 on all 164 when the tests ran in the program's process
    hack = jobs("import os\nos._exit = lambda *a: None\n" for _ in humaneval)
    scores = pool.map(good + broken + hack)
    failed = [r["task_id"] for r, s in zip(humaneval, scores[:164], strict=True) if s.reward != 1.0]
    passed_broken = [
        r["task_id"] for r, s in zip(humaneval, scores[164:328], strict=True) if s.reward != 0.0
    ]
    passed_hack = [
        r["task_id"] for r, s in zip(humaneval, scores[328:], strict=True) if s.reward != 0.0
    ]
    assert failed == [], [s.error for s in scores[:164] if s.reward != 1.0]
    assert passed_broken == []
    assert passed_hack == []
