"""The verifier pool: scores in order, hard timeouts, failures as reward=None with a reason."""

from __future__ import annotations

import threading
import time

import pytest

from protocol.messages import Score
from rewarder.pool import Job, VerifierPool
from rewarder.sandbox import SandboxConfig, isolation
from tests.unit.rewarder.leftovers import assert_nothing_left

MATH = {"accuracy_math": 1.0, "format_think": 0.1}


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=20.0) as pool:
        yield pool


def test_scores_come_back_in_input_order(pool):
    jobs = [Job(rf"<think>x</think> \boxed{{{i}}}", "3", MATH) for i in range(6)]
    scores = pool.map(jobs)
    # only i=3 is right: 1.0*1 + 0.1*1 = 1.1; the others 0.1 for the format alone
    assert [s.reward for s in scores] == pytest.approx([0.1, 0.1, 0.1, 1.1, 0.1, 0.1])
    assert scores[3].components == {"accuracy_math": 1.0, "format_think": 1.0}
    assert all(isinstance(s, Score) and s.error is None for s in scores)


def test_a_verifier_error_is_counted_and_never_a_silent_zero(pool):
    before = pool.stats.errors
    [score] = pool.map([Job(r"\boxed{1}", "", MATH)])  # the reference does not parse
    assert score.reward is None and score.error.startswith("accuracy_math: could not parse")
    assert score.components == {"accuracy_math": None, "format_think": 0.0}
    assert pool.stats.errors == before + 1 and pool.stats.by_error["accuracy_math"] >= 1


def test_math_verify_times_out_in_worker_main_threads_not_in_ours():
    """The pool runs Math-Verify in each worker's main thread, so a caller thread works
    (Math-Verify#55: signal.alarm raises ValueError outside the main thread)."""
    out = {}

    def score():
        with VerifierPool(workers=1, timeout_s=20.0) as pool:
            out["scores"] = pool.map([Job(r"\boxed{\frac12}", "0.5", {"accuracy_math": 1.0})])

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert out["scores"][0].reward == 1.0


@pytest.mark.skipif(isolation() != "namespaces", reason="checks sandbox cleanup after a kill")
def test_a_stuck_worker_is_killed_and_replaced_and_its_sandbox_dies_with_it(monkeypatch):
    # the program would run 60 s: its sandbox allows it and, patched out here (the workers are
    # forked from this process), so does code_tests' budget, as a verifier bug would; the
    # pool's 1 s timeout kills the worker
    import rewarder._preload  # noqa: F401  (forked workers start warm, as the forkserver's do)
    from rewarder import code

    monkeypatch.setattr(code, "fit_code_budget", lambda timeout_s: None)
    slow = SandboxConfig(wall_seconds=60, cpu_seconds=60)
    stuck = Job(
        "import time\ntime.sleep(60)\n", {"inputs": [""], "outputs": [""]}, {"code_tests": 1.0}
    )
    with VerifierPool(workers=2, timeout_s=1.0, sandbox=slow, start_method="fork") as pool:
        start = time.monotonic()
        scores = pool.map([stuck, Job(r"\boxed{2}", "2", {"accuracy_math": 1.0}), stuck])
        assert time.monotonic() - start < 10
        assert [s.reward for s in scores] == [None, 1.0, None]
        assert scores[0].error == "timeout: verifier still running after 1s"
        assert (pool.stats.timeouts, pool.stats.restarts) == (2, 2)
        assert_nothing_left()  # setpriv --pdeathsig took the sandbox down with the worker
        # the replacements work
        assert pool.map([Job(r"\boxed{2}", "2", {"accuracy_math": 1.0})])[0].reward == 1.0


async def test_score_async_keeps_the_event_loop_free(pool):
    scores = await pool.score_async([Job("<think>a</think> 5", None, {"format_think": 1.0})])
    assert scores[0].reward == 1.0


@pytest.mark.skipif(isolation() != "namespaces", reason="runs model-style code")
def test_a_program_that_hangs_is_a_zero_before_the_pools_timeout():
    """ "No reward" is left out of the advantage: a program must not reach it by hanging on every
    test case. code_tests spends at most half the per-call timeout on one completion's runs,
    so it is a 0 with the reason, whatever the sandbox's own wall time."""
    slow = SandboxConfig(wall_seconds=60, cpu_seconds=60)
    cases = {"inputs": ["1", "2", "3", "4"], "outputs": ["1", "2", "3", "4"]}
    humaneval = {"entry_point": "f", "test": "def check(candidate):\n    assert candidate()\n"}
    hang = "import time\ntime.sleep(60)\ndef f():\n    return 1\n"
    echo = "import sys\nv = input()\nif v == '3':\n    import time; time.sleep(60)\nprint(v)\n"
    with VerifierPool(workers=2, timeout_s=6.0, sandbox=slow) as pool:
        start = time.monotonic()
        stalled, partial, tests = pool.map(
            [
                Job(hang, cases, {"code_tests": 1.0}),
                Job(echo, cases, {"code_tests": 1.0}),
                Job(hang, humaneval, {"code_tests": 1.0}),
            ]
        )
        assert time.monotonic() - start < 6.0 + 2
        assert pool.stats.timeouts == 0
    assert stalled.reward == 0.0 and "none passed" in stalled.note
    assert partial.reward == 0.5  # 1 and 2 passed, 3 hung until the budget ran out, 4 never ran
    assert tests.reward == 0.0 and "wall time" in tests.note
    assert_nothing_left()


def test_a_completion_that_kills_its_verifier_twice_is_a_zero_not_no_reward(monkeypatch, tmp_path):
    """A worker that dies is replaced and the completion scored once more: a crash that does
    not come back (the machine's) is forgotten; one that does is the completion's 0 with the
    reason, since "no reward" would be an escape from its 0. The verifier bug is injected
    into the forked workers' registry."""
    import os

    import rewarder._preload  # noqa: F401  (forked workers start warm)
    from rewarder import rewards

    flag = tmp_path / "crashed-once"
    real = rewards.REWARDS["accuracy_math"]

    def fragile(completion, reference, task=None):
        if "ALWAYS" in completion or ("ONCE" in completion and not flag.exists()):
            flag.touch()
            os._exit(3)
        return real(completion, reference, task)

    monkeypatch.setitem(rewards.REWARDS, "accuracy_math", fragile)
    rewards_of = {"accuracy_math": 1.0, "format_think": 0.5}
    with VerifierPool(workers=2, timeout_s=20, start_method="fork") as pool:
        once, always, fine = pool.map(
            [
                Job(r"<think>ONCE</think> \boxed{2}", "2", rewards_of),
                Job(r"<think>ALWAYS</think> \boxed{2}", "2", rewards_of),
                Job(r"<think>a</think> \boxed{2}", "2", rewards_of),
            ]
        )
        assert pool.stats.crashes == 3 and pool.stats.restarts == 3
    assert once.reward == 1.5 and once.note is None
    assert always.reward == 0.0 and always.error is None
    assert always.components == {"accuracy_math": 0.0, "format_think": 0.0}
    assert "killed its verifier twice (exit code 3)" in always.note
    assert fine.reward == 1.5
