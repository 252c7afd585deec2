"""Hand-worked cases for every reward, the reward-hacking attempts first among them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rewarder import rewards
from rewarder.errors import VerifierError
from rewarder.rewards import (
    PLUGIN_SEPARATOR,
    REWARDS,
    accuracy_gsm8k,
    accuracy_math,
    code_tests,
    extract_program,
    final_answer,
    format_think,
    grade,
    gsm8k_answer,
    language_consistency,
    split_think,
)
from tests.helpers import make_task


def task_with(**meta):
    return make_task(meta=meta)


def graded(completion, reference, reward="accuracy_math", task=None):
    """(reward, note) of one reward, weight 1; a verifier error fails the test."""
    result = grade(completion, reference, {reward: 1.0}, task)
    assert result.error is None, result.error
    return result.reward, result.note


# --- where the answer is -------------------------------------------------------------------


def test_split_think():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("<think>a") == ("a", "")  # unclosed: everything is still thinking
    assert split_think("b") == (None, "b")
    # a prompt that ends in "<think>" leaves only the closing tag in the completion
    assert split_think("a</think>b") == ("a", "b")
    # reopening after the answer ends the answer there
    assert split_think("<think>a</think>b<think>c") == ("a", "b")


def test_final_answer_is_the_last_boxed_with_nested_braces():
    assert final_answer(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert final_answer(r"\boxed{1} and an unclosed \boxed{2") == "1"
    assert final_answer(r"<answer>so \boxed{3}</answer>") == "3"
    assert final_answer("<answer> 4 </answer>") == "4"
    assert final_answer("no answer at all") is None


# --- accuracy_math -------------------------------------------------------------------------


def test_math_several_boxed_answers_only_the_last_counts():
    # hacking: box every candidate; the right one (5) is not the last
    assert accuracy_math(r"\boxed{5} or maybe \boxed{6}", "5") == 0.0
    assert accuracy_math(r"\boxed{6} no wait \boxed{5}", "5") == 1.0


def test_math_answer_only_inside_think_does_not_count():
    assert accuracy_math(r"<think>it is \boxed{5}</think> I am not sure.", "5") == 0.0
    assert accuracy_math(r"<think>it is \boxed{5}</think> \boxed{5}", "5") == 1.0


def test_math_unclosed_tags_give_no_answer():
    # unclosed <think>: the whole text is still the chain of thought
    assert accuracy_math(r"<think>so \boxed{5}", "5") == 0.0
    # <think> reopened after the answer: what follows is thinking again
    assert accuracy_math(r"<think>a</think> \boxed{4} <think> \boxed{5}", "5") == 0.0
    # an unclosed \boxed{ is no answer
    assert accuracy_math(r"\boxed{5", "5") == 0.0


def test_math_answer_tag():
    assert accuracy_math("<think>2+3</think><answer>5</answer>", "5") == 1.0
    # the last <answer> block is the answer
    assert accuracy_math("<answer>5</answer><answer>6</answer>", "5") == 0.0
    # the task asks for <answer>: a bare \boxed{} is not enough
    assert accuracy_math(r"\boxed{5}", "5", task_with(answer_tag=True)) == 0.0
    assert accuracy_math(r"<answer>\boxed{5}</answer>", "5", task_with(answer_tag=True)) == 1.0


@pytest.mark.parametrize("pred", [r"\frac12", "0.5", "1/2", r"\dfrac{1}{2}", r"\frac{2}{4}"])
def test_math_one_half_in_every_spelling(pred):
    assert accuracy_math(rf"\boxed{{{pred}}}", r"\frac{1}{2}") == 1.0


def test_math_tuples_with_left_right():
    ref = r"\left( 3, \frac{\pi}{2} \right)"
    assert accuracy_math(r"\boxed{(3, \frac{\pi}{2})}", ref) == 1.0
    assert accuracy_math(r"\boxed{\left(3,\pi/2\right)}", ref) == 1.0
    assert accuracy_math(r"\boxed{(\frac{\pi}{2}, 3)}", ref) == 0.0  # order matters
    assert accuracy_math(r"\boxed{(3, \pi)}", ref) == 0.0


def test_math_huge_numbers():
    # 18 digits differing in the last: floats would call them equal, integers do not
    assert accuracy_math(r"\boxed{123456789012345679}", "123456789012345678") == 0.0
    assert accuracy_math(r"\boxed{123456789012345678}", "123456789012345678") == 1.0
    assert accuracy_math(r"\boxed{10^{100}+1}", "10^{100}") == 0.0
    # 9^(9^(9^9)) cannot even be written down: it scores 0 at once instead of hanging sympy
    reward, note = graded(r"\boxed{9^{9^{9^{9}}}}", "9")
    assert reward == 0.0 and "100,000 digits" in note
    assert graded(r"\boxed{(10^{100})!}", "3")[0] == 0.0
    # an ordinary big power is still compared: 2^10 = 1024
    assert accuracy_math(r"\boxed{2^{10}}", "1024") == 1.0


def test_math_a_list_of_guesses_is_not_the_answer():
    assert accuracy_math(r"\boxed{1, 2, 3}", "3") == 0.0
    assert accuracy_math(r"\boxed{3 \text{ or } 4}", "3") == 0.0


def test_math_equivalent_forms():
    assert accuracy_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") == 1.0
    assert accuracy_math(r"\boxed{1+x^2}", "x^2+1") == 1.0
    assert accuracy_math(r"\boxed{2x}", "2") == 0.0
    # MATH-500 writes money with an escaped dollar: \$18.90
    assert accuracy_math(r"\boxed{18.90}", r"\$18.90") == 1.0


def test_math_no_answer_is_zero_and_a_bad_reference_is_an_error():
    assert accuracy_math("I think it is five.", "5") == 0.0
    assert accuracy_math(r"\boxed{}", "5") == 0.0
    with pytest.raises(VerifierError, match="reference"):
        accuracy_math(r"\boxed{5}", "")


def test_math_an_equation_counts_only_if_all_its_sides_are_equal():
    assert graded(r"\boxed{x = 5}", "5") == (1.0, None)
    assert graded(r"\boxed{x = 2+3 = 5}", "5") == (1.0, None)  # every side is 5, x names it
    # hacking: one chain covering several guesses (Math-Verify compared the last side only)
    for hedge in [r"x = 6 = 5", r"x = 1 = 2 = 3 = 5", r"5 = 6 = 5", r"x = 5 = 6"]:
        reward, note = graded(rf"\boxed{{{hedge}}}", "5")
        assert reward == 0.0 and "are not all equal" in note, hedge
    reward, note = graded("<think>5</think><answer>$x = 6 = 5$</answer>", "5")
    assert reward == 0.0 and "are not all equal" in note
    # a false equation is not its right side: 5 = 6 is not the answer 6
    assert graded(r"\boxed{5 = 6}", "6")[0] == 0.0
    # a reference that is an equation is compared whole, and the same rule holds
    assert graded(r"\boxed{y = 2x + 3}", "y = 2x + 3") == (1.0, None)
    reward, note = graded(r"\boxed{y = 2x + 3 = 5}", "y = 2x + 3")
    assert reward == 0.0 and "are not all equal" in note
    # each item of a list is its own equation
    assert graded(r"\boxed{a = 2, b = 3}", "(2, 3)") == (1.0, None)
    assert graded(r"\boxed{x = 1 \text{ or } x = 2}", "1, 2") == (1.0, None)
    reward, note = graded(r"\boxed{a = 2, b = 1 = 3}", "(2, 3)")
    assert reward == 0.0 and "are not all equal" in note


def test_math_an_approximation_is_not_an_exact_answer():
    # Math-Verify drops the sign: `5 \approx 7` parsed as 5
    for answer in [r"5 \approx 7", r"\approx 5", r"x \approx 5", "5 ≈ 5", r"5 \simeq 5"]:
        reward, note = graded(rf"\boxed{{{answer}}}", "5")
        assert reward == 0.0 and "approximate" in note, answer
    assert graded(r"\boxed{\approx 5}", r"\approx 5")[0] == 1.0  # unless asked for


def test_math_a_percent_sign_is_notation_one_answer_one_value():
    # `5\%` is the number 5, written as a percentage; it no longer covers 0.05 as well
    assert graded(r"\boxed{5\%}", "5")[0] == 1.0
    assert graded(r"\boxed{5\%}", r"5\%")[0] == 1.0
    assert graded(r"\boxed{5}", r"5\%")[0] == 1.0
    assert graded(r"\boxed{5\%}", "0.05")[0] == 0.0
    assert graded(r"\boxed{5%}", "0.05")[0] == 0.0
    assert graded(r"\boxed{0.05}", r"5\%")[0] == 0.0


def test_math_an_answer_too_long_to_be_one_scores_zero_with_its_reason():
    answer = "+".join(["1"] * 600)  # 1,199 characters
    reward, note = graded(rf"\boxed{{{answer}}}", "600")
    assert reward == 0.0 and "1,199 characters" in note
    assert graded(rf"\boxed{{{'+'.join(['1'] * 400)}}}", "400") == (1.0, None)  # 799: compared


@pytest.fixture
def no_gc_callbacks():
    """Hypothesis (another test file's) leaves a gc callback in this process; Math-Verify's
    SIGALRM timeout raised inside it is swallowed ("Exception ignored in gc_callback") and the
    stall then runs for minutes. Verifier workers have no gc callbacks."""
    import gc

    saved = gc.callbacks[:]
    gc.callbacks.clear()
    yield
    gc.callbacks.extend(saved)


def test_math_an_answer_that_stalls_math_verify_scores_zero_not_null(monkeypatch, no_gc_callbacks):
    # comparing this product with 5 makes sympy work for minutes; the reference verifies fine,
    # so the stall is the completion's: 0 with the reason (it was `null`: no reward, a dodge)
    monkeypatch.setattr(rewards, "ANSWER_BUDGET_S", 2)
    product = r"\prod_{k=1}^{3000} (1 + \frac{1}{k^2})"
    # comparing it; sizing it as an exponent (sympy evaluates it numerically)
    for answer in [product, f"2^{{{product}}}"]:
        start = time.perf_counter()
        reward, note = graded(rf"\boxed{{{answer}}}", "5")
        assert reward == 0.0 and "timed out" in note, answer
        assert time.perf_counter() - start < 15
    # a pool worker fits the budget into its per-call timeout: a third of it, 1 to 10 s
    for timeout_s, budget in [(6, 2), (2, 1), (30, 10), (300, 10)]:
        rewards.fit_answer_budget(timeout_s)
        assert rewards.ANSWER_BUDGET_S == budget
    # while a reference that does not parse is the verifier's problem: no reward
    result = grade(r"\boxed{5}", "", {"accuracy_math": 1.0})
    assert result.reward is None and "reference" in result.error


# --- accuracy_gsm8k ------------------------------------------------------------------------


def test_gsm8k_reference_forms():
    # GSM8K answer text: the number after ####
    assert accuracy_gsm8k(r"\boxed{72}", "She sold 48/2 = <<48/2=24>>24 ... #### 72") == 1.0
    assert accuracy_gsm8k(r"\boxed{72}", "72") == 1.0
    assert accuracy_gsm8k(r"\boxed{72}", 72) == 1.0
    with pytest.raises(VerifierError):
        accuracy_gsm8k(r"\boxed{72}", "#### seventy-two")


@pytest.mark.parametrize(
    "completion",
    [
        r"So \boxed{72}.",
        "<answer>72</answer>",
        "#### 72",
        "The answer is 72.",
        "The answer is: $72",
        "She earned 10 then 62 more, 72 in all.",  # the last number
        r"\boxed{72.0}",
        r"\boxed{\$72}",
        "The answer is 72 dollars.",
    ],
)
def test_gsm8k_prediction_forms(completion):
    assert accuracy_gsm8k(completion, "#### 72") == 1.0


def test_gsm8k_number_normalisation():
    assert accuracy_gsm8k(r"\boxed{1,000}", "#### 1000") == 1.0
    assert accuracy_gsm8k(r"\boxed{\$1,200.50}", "1200.5") == 1.0
    assert accuracy_gsm8k(r"\boxed{25\%}", "#### 25") == 1.0
    assert accuracy_gsm8k(r"\boxed{-3}", "#### -3") == 1.0
    assert accuracy_gsm8k(r"\boxed{\frac{3}{4}}", "0.75") == 1.0
    # 72.5 is not 72 (no rounding)
    assert accuracy_gsm8k(r"\boxed{72.5}", "#### 72") == 0.0
    assert gsm8k_answer("costs $1,234,567.8 total") == Fraction("1234567.8")


def test_gsm8k_hacking_attempts():
    # a list of guesses in the box is no answer, even if it contains the right one
    assert accuracy_gsm8k(r"\boxed{71, 72}", "#### 72") == 0.0
    # the final answer is the boxed one, not the last number written after it
    assert accuracy_gsm8k(r"\boxed{71} (not 72)", "#### 72") == 0.0
    # the answer only inside <think>
    assert accuracy_gsm8k("<think>the answer is 72</think> I give up", "#### 72") == 0.0
    assert accuracy_gsm8k("<think>the answer is 72", "#### 72") == 0.0
    # "the answer is" beats a later stray number: 72 is the answer, 3 is not
    assert accuracy_gsm8k("The answer is 72. Checked 3 times.", "#### 72") == 1.0
    # huge number: exact, 10^20 + 1 != 10^20
    assert accuracy_gsm8k(r"\boxed{100000000000000000001}", "100000000000000000000") == 0.0


def test_gsm8k_a_number_too_long_to_read_scores_zero_with_its_reason():
    # Python refuses to read an int of over 4,300 digits: that ValueError was `null`
    reward, note = graded("The answer is " + "7" * 5_000, "#### 5", "accuracy_gsm8k")
    assert reward == 0.0 and "over 100 characters" in note
    with pytest.raises(VerifierError):
        accuracy_gsm8k(r"\boxed{5}", "#### " + "7" * 5_000)


# --- format_think --------------------------------------------------------------------------


def test_format_think_r1_template():
    assert format_think("<think>2+3=5</think> The answer is 5.") == 1.0
    assert format_think("\n<think>x</think>\n<answer>5</answer>\n") == 1.0
    assert format_think("The answer is 5.") == 0.0  # no think block
    assert format_think("<think>x</think>") == 0.0  # no answer after it
    assert format_think("<think> </think> 5") == 0.0  # empty thought
    assert format_think("5 <think>x</think> 5") == 0.0  # think must come first
    assert format_think("<think>x</think> 5 <think>y</think> 6") == 0.0  # only one
    assert format_think("<think>x 5") == 0.0  # unclosed
    assert format_think("<think>x</think></think> 5") == 0.0


def test_format_think_with_answer_tag():
    task = task_with(answer_tag=True)
    assert format_think("<think>x</think> <answer>5</answer>", None, task) == 1.0
    assert format_think("<think>x</think> 5", None, task) == 0.0
    assert format_think("<think>x</think> <answer>5</answer> trailing", None, task) == 0.0
    assert format_think("<think>x</think> <answer>5", None, task) == 0.0  # unclosed
    assert format_think("<think>x</think> <answer></answer>", None, task) == 0.0
    assert format_think("<think>x</think> <answer>5</answer><answer>6</answer>", None, task) == 0.0
    # without the tag asked for, a malformed block still fails
    assert format_think("<think>x</think> </answer>5<answer>") == 0.0


# --- language_consistency ------------------------------------------------------------------


def test_language_consistency_is_the_share_of_target_script_words():
    # words: "Let"(L) "x"(L) "be"(L) 二(CJK) 三(CJK) -> 3 of 5 Latin
    assert language_consistency("<think>Let x be 二三</think> 5") == pytest.approx(3 / 5)
    # the same thought graded for Chinese: 2 of 5
    assert language_consistency(
        "<think>Let x be 二三</think>", None, task_with(language="zh")
    ) == pytest.approx(2 / 5)
    # only the chain of thought counts, not the answer after it
    assert language_consistency("<think>two plus three</think> 五") == 1.0
    # no think tags: the whole completion
    assert language_consistency("two 二") == 0.5


def test_language_consistency_ignores_math():
    # \frac and \pi are LaTeX, π a math symbol, 1/2 no word: words are "half"(L) "of"(L)
    assert language_consistency(r"<think>half of \frac{1}{2} \pi π 3</think>") == 1.0
    # Japanese: kana and kanji are all the target; "ok" is not: 3 of 4 (日, 本, ご, ok)
    assert language_consistency(
        "<think>日本ご ok</think>", None, task_with(language="ja")
    ) == pytest.approx(3 / 4)
    # Russian: Cyrillic words, "x" is Latin: 2 of 3
    assert language_consistency(
        "<think>пусть x равно</think>", None, task_with(language="ru")
    ) == pytest.approx(2 / 3)


def test_language_consistency_edge_cases():
    assert language_consistency("<think>1 + 2 = 3</think>") == 0.0  # no words to judge
    with pytest.raises(VerifierError, match="xx"):
        language_consistency("<think>hi</think>", None, task_with(language="xx"))


# --- completions that stall the verifier -----------------------------------------------------

STALLING = {
    # each was quadratic (or worse) in some extractor: minutes, so a timeout and no reward
    "20,000 unclosed boxed": "\\boxed{" * 20_000,
    "20,000 unclosed fbox": "\\fbox {" * 20_000,
    "20,000 answer opens": "<answer>7 " * 20_000,
    "20,000 answer opens, one close": "<answer>" * 20_000 + "7</answer>",
    "20,000 unclosed boxed in an answer": "<answer>" + "\\boxed{" * 20_000 + "</answer>",
    "braces 100,000 deep": "\\boxed{" + "{" * 100_000 + "7" + "}" * 100_000 + "}",
    "1 MB unclosed think": "<think>" + "so 7 " * 200_000,
    "1 MB think, then a wrong answer": "<think>" + "so 7 " * 200_000 + "</think> \\boxed{7}",
    "50,000 think blocks": "<think>x</think>" * 50_000 + " 7",
    "a million digits": "1" * 1_000_000,
    "digit runs and no fraction bar": ("1" * 100_000 + " ") * 5,
    "100,000 numbers and fractions": "1/2 3, 4,000.5 " * 25_000 + " 7",
    "'the answer is' 70,000 times": "the answer is " * 70_000,
    "a chain of 50,000 guesses": "\\boxed{x = " + "1 = " * 50_000 + "7}",
    "400,000 Chinese characters": "<think>" + "我们来算" * 100_000 + "</think> 7",
}


@pytest.mark.parametrize("name", STALLING)
def test_a_stalling_completion_scores_zero_in_time(name):
    completion = STALLING[name]
    for task in (None, task_with(answer_tag=True)):
        start = time.perf_counter()
        math = grade(completion, "5", {"accuracy_math": 1.0, "language_consistency": 1.0}, task)
        gsm8k = grade(completion, "#### 5", {"accuracy_gsm8k": 1.0, "format_think": 1.0}, task)
        elapsed = time.perf_counter() - start
        assert math.error is None and gsm8k.error is None, (math.error, gsm8k.error)
        assert math.components["accuracy_math"] == 0.0
        assert gsm8k.components["accuracy_gsm8k"] == 0.0
        # up to 1 MB through four rewards: linear work takes well under a second here
        assert elapsed < 5.0, f"{name}: {elapsed:.1f} s"


@pytest.mark.parametrize(
    "extract, make",
    [
        (final_answer, lambda n: "\\boxed{" * n),
        (final_answer, lambda n: "<answer>" * n + "</answer>"),
        (gsm8k_answer, lambda n: "1" * (10 * n) + " 7"),
        (gsm8k_answer, lambda n: "1/2 3, 4,000.5 " * n),
        (format_think, lambda n: "<think>" + "<answer>" * n + "</think>" + "<answer>" * n),
        (language_consistency, lambda n: "<think>" + "so 我 x " * n),
    ],
)
def test_extraction_time_grows_linearly(extract, make):
    def best_of_3(n):
        text = make(n)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            extract(text)
            times.append(time.perf_counter() - start)
        return min(times)

    small, large = best_of_3(5_000), best_of_3(20_000)
    # 4x the input: about 4x the time when linear, 16x when quadratic
    assert large < 10 * small + 0.05, (small, large)


@pytest.mark.slow
def test_aha_score_gives_a_stalling_completion_zero_not_null(tmp_path):
    """Through the real command and its verifier worker processes (`VerifierPool`)."""
    rows = [
        {"completion": "\\boxed{" * 20_000, "reference": "5", "rewards": {"accuracy_math": 1}},
        {
            "completion": "<answer>" * 20_000,
            "reference": "5",
            "rewards": {"accuracy_math": 1.0},
            "meta": {"answer_tag": True},
        },
        {"completion": "1" * 1_000_000, "reference": "#### 5", "rewards": {"accuracy_gsm8k": 1}},
        {
            "completion": r"\boxed{\prod_{k=1}^{3000} (1 + \frac{1}{k^2})}",
            "reference": "5",
            "rewards": {"accuracy_math": 1.0},
        },
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a 6 s timeout: Math-Verify gets 2 s of it, so the stall is the completion's 0 in time
    argv = [sys.executable, "-m", "deploy.cli", "score", src, "-o", out, "--timeout", "6"]
    result = subprocess.run(
        argv, cwd=Path(__file__).parents[3], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["reward"], s["error"]) for s in scored] == [(0.0, None)] * 4
    # why: no answer at all is a plain 0; the others are 0 by a rule, which the line says
    notes = [s["note"] for s in scored]
    assert notes[:2] == [None, None]
    assert notes[2].startswith("accuracy_gsm8k: the predicted number is over 100 characters")
    assert notes[3].startswith("accuracy_math: comparing the answer with the reference timed out")
    assert "4/4" in result.stderr and "0 without reward" in result.stderr


# --- code_tests (the sandbox itself is tested in test_sandbox.py) ---------------------------

ADD_TEST = {
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}


def test_extract_program():
    text = "<think>```python\nbad()\n```</think>Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```\n```text\nno\n```"
    assert extract_program(text) == "x = 2\n"  # the last python block after the thought
    assert extract_program("def f(): pass") == "def f(): pass"  # no block: the whole text


def test_code_tests_humaneval_style():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert graded(good, ADD_TEST, "code_tests") == (1.0, None)
    assert graded("def add(a, b):\n    return None\n", ADD_TEST, "code_tests") == (0.0, None)
    reward, note = graded("def add(a, b):\n    return a +\n", ADD_TEST, "code_tests")
    assert reward == 0.0 and "SyntaxError" in note
    # hacking attempts, each a 0: test_code_hacking.py


def test_code_tests_stdin_stdout_cases():
    ref = {"inputs": ["2 3\n", "10 -4\n", "1 1\n"], "outputs": ["5\n", "6", "3\n"]}
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    # 2+3=5 ok, 10-4=6 ok (trailing newline ignored), 1+1=2 != 3: 2 of 3 pass
    assert code_tests(f"```python\n{program}```", ref) == pytest.approx(2 / 3)
    assert code_tests("print(5)", ref) == pytest.approx(1 / 3)
    with pytest.raises(VerifierError):
        code_tests("print(5)", {"inputs": ["1"], "outputs": []})
    with pytest.raises(VerifierError):
        code_tests("print(5)", "not json")
    with pytest.raises(VerifierError, match="inputs text"):
        code_tests("print(5)", {"inputs": [1], "outputs": ["5"]})


# --- the total -----------------------------------------------------------------------------


def test_registry_names_every_reward():
    # plug-ins (`package.module:function`) join it in a process that loads them (other tests)
    assert {name for name in REWARDS if PLUGIN_SEPARATOR not in name} == {
        "accuracy_math",
        "accuracy_gsm8k",
        "format_think",
        "language_consistency",
        "code_tests",
    }


def test_weighted_total_keeps_every_component():
    completion = r"<think>1+1</think> \boxed{2}"
    # accuracy 1, format 1: total = 1.0*1 + 0.1*1 = 1.1
    assert grade(completion, "2", {"accuracy_math": 1.0, "format_think": 0.1}) == (
        pytest.approx(1.1),
        {"accuracy_math": 1.0, "format_think": 1.0},
        None,
        None,
    )
    # wrong answer, right format: 1.0*0 + 0.1*1 = 0.1
    reward, components, error, _ = grade(
        r"<think>x</think> \boxed{3}", "2", {"accuracy_math": 1.0, "format_think": 0.1}
    )
    assert reward == pytest.approx(0.1) and components == {
        "accuracy_math": 0.0,
        "format_think": 1.0,
    }


def test_a_disqualified_component_is_zero_with_its_reason_and_the_total_is_kept():
    completion = "<think>x</think> \\boxed{" + "{" * 2_000 + "5" + "}" * 2_000 + "}"
    result = grade(completion, "5", {"accuracy_math": 1.0, "format_think": 0.1})
    # accuracy 0 (not an answer: 4,001 characters), format 1: total = 1.0*0 + 0.1*1 = 0.1
    assert result.reward == pytest.approx(0.1) and result.error is None
    assert result.components == {"accuracy_math": 0.0, "format_think": 1.0}
    assert result.note.startswith("accuracy_math: the final answer is 4,001 characters long")
    # what a `Score` carries: the 0, no error
    assert grade(completion, "5", {"accuracy_math": 1.0})[:3] == (
        0.0,
        {"accuracy_math": 0.0},
        None,
    )


def test_a_verifier_error_is_no_reward_with_the_reason_never_zero():
    reward, components, error, _ = grade(
        r"<think>x</think> \boxed{3}", "", {"accuracy_math": 1.0, "format_think": 0.1}
    )
    assert reward is None
    assert components == {"accuracy_math": None, "format_think": 1.0}  # the others are kept
    assert error.startswith("accuracy_math: could not parse the reference")
    reward, _, error, _ = grade("x", "1", {"nope": 1.0})
    assert reward is None and error.startswith("nope: unknown reward")
