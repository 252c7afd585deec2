"""Hand-worked cases for every reward, the reward-hacking attempts first among them."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rewarder.errors import VerifierError
from rewarder.rewards import (
    REWARDS,
    accuracy_gsm8k,
    accuracy_math,
    code_tests,
    extract_program,
    final_answer,
    format_think,
    gsm8k_answer,
    language_consistency,
    score_completion,
    split_think,
)
from tests.helpers import make_task


def task_with(**meta):
    return make_task(meta=meta)


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
    assert accuracy_math(r"\boxed{9^{9^{9^{9}}}}", "9") == 0.0
    assert accuracy_math(r"\boxed{(10^{100})!}", "3") == 0.0
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
    assert code_tests(good, ADD_TEST) == 1.0
    assert code_tests("def add(a, b):\n    return None\n", ADD_TEST) == 0.0
    assert code_tests("def add(a, b):\n    return a +\n", ADD_TEST) == 0.0  # syntax error


def test_code_tests_hacking_attempts():
    # exiting cleanly before the tests run is not passing them
    for exit_early in [
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "exit()",
        "raise SystemExit",
    ]:
        assert code_tests(f"def add(a, b):\n    return 0\n{exit_early}\n", ADD_TEST) == 0.0, (
            exit_early
        )
    # an object equal to everything does not pass `assert candidate(x) == y`
    always_equal = (
        "class E:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return E()\n"
    )
    assert code_tests(always_equal, ADD_TEST) == 0.0
    # nor an int subclass that does the same
    int_equal = (
        "class I(int):\n    def __eq__(self, o): return True\ndef add(a, b):\n    return I(0)\n"
    )
    assert code_tests(int_equal, ADD_TEST) == 0.0
    # patching builtins while defining the function is undone before the tests
    near = {
        "entry_point": "half",
        "test": "def check(candidate):\n    assert abs(candidate(3) - 1.5) < 1e-6\n",
    }
    assert code_tests("def half(x):\n    return x / 2\n", near) == 1.0
    patch = "import builtins\nbuiltins.abs = lambda x: 0\ndef half(x):\n    return 0.0\n"
    assert code_tests(patch, near) == 0.0
    # printing a guess of the pass marker does not help: it is a fresh nonce each run
    assert code_tests("print('ok')\nimport os; os._exit(0)\n", ADD_TEST) == 0.0


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


# --- the total -----------------------------------------------------------------------------


def test_registry_names_every_reward():
    assert set(REWARDS) == {
        "accuracy_math",
        "accuracy_gsm8k",
        "format_think",
        "language_consistency",
        "code_tests",
    }


def test_weighted_total_keeps_every_component():
    completion = r"<think>1+1</think> \boxed{2}"
    # accuracy 1, format 1: total = 1.0*1 + 0.1*1 = 1.1
    assert score_completion(completion, "2", {"accuracy_math": 1.0, "format_think": 0.1}) == (
        pytest.approx(1.1),
        {"accuracy_math": 1.0, "format_think": 1.0},
        None,
    )
    # wrong answer, right format: 1.0*0 + 0.1*1 = 0.1
    reward, components, error = score_completion(
        r"<think>x</think> \boxed{3}", "2", {"accuracy_math": 1.0, "format_think": 0.1}
    )
    assert reward == pytest.approx(0.1) and components == {
        "accuracy_math": 0.0,
        "format_think": 1.0,
    }


def test_a_verifier_error_is_no_reward_with_the_reason_never_zero():
    reward, components, error = score_completion(
        r"<think>x</think> \boxed{3}", "", {"accuracy_math": 1.0, "format_think": 0.1}
    )
    assert reward is None
    assert components == {"accuracy_math": None, "format_think": 1.0}  # the others are kept
    assert error.startswith("accuracy_math: could not parse the reference")
    reward, _, error = score_completion("x", "1", {"nope": 1.0})
    assert reward is None and error.startswith("nope: unknown reward")
