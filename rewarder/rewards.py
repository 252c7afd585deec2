"""The rule-based rewards of DeepSeek-R1, and their weighted total.

Each reward is `(completion, reference, task) -> float` and raises `VerifierError` when it
cannot decide (never a silent 0). `task` is the `protocol.messages.Task` the completion
answers, or None for offline scoring; rewards read only `task.meta`:

- `language`: target language of the chain of thought (`language_consistency`), default `en`;
- `answer_tag`: the task asks for `<answer>…</answer>` (`format_think`, and then the final
  answer must be inside it for `accuracy_math` / `accuracy_gsm8k`).

The answer is what follows the chain of thought: the text after the last `</think>`, cut at
any later `<think>`; an unclosed `<think>` leaves no answer at all. So an answer that only
appears while thinking never counts (DeepSeek-R1, arXiv:2501.12948, section 2.2.2).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from rewarder.code import code_tests, configure_sandbox, extract_program  # noqa: F401
from rewarder.errors import VerifierError

RewardFn = Callable[[str, Any, Any], float]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
HUGE_DIGITS = 100_000
"""A numeric sub-expression with more decimal digits than this is not a final answer (9^{9^9}):
it scores 0 instead of hanging the verifier, unless the reference is itself that huge."""


def _meta(task: Any) -> dict[str, Any]:
    return dict(getattr(task, "meta", None) or {})


# --- where the answer is -------------------------------------------------------------------


def split_think(completion: str) -> tuple[str | None, str]:
    """(chain of thought or None, answer part) of a completion.

    `<think>a</think>b` -> ("a", "b"); `<think>a` (unclosed) -> ("a", ""); `b` -> (None, "b");
    a `<think>` reopened after the last `</think>` ends the answer there.
    """
    if THINK_CLOSE in completion:
        thought, _, answer = completion.rpartition(THINK_CLOSE)
        thought = thought.split(THINK_OPEN, 1)[-1]
        return thought, answer.split(THINK_OPEN, 1)[0]
    if THINK_OPEN in completion:
        return completion.split(THINK_OPEN, 1)[1], ""
    return None, completion


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` (or `\\fbox{…}`), nested braces allowed."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def final_answer(completion: str, task: Any = None) -> str | None:
    """The final answer: inside the last closed `<answer>` block (its last `\\boxed{}` if it has
    one, else its text), else the last `\\boxed{}`; only after the chain of thought.

    With `task.meta["answer_tag"]` only an `<answer>` block counts.
    """
    _, answer = split_think(completion)
    blocks = ANSWER_BLOCK.findall(answer)
    if blocks:
        boxed = last_boxed(blocks[-1])
        return boxed if boxed is not None else blocks[-1].strip()
    if _meta(task).get("answer_tag"):
        return None
    return last_boxed(answer)


# --- accuracy_math -------------------------------------------------------------------------


def _in_main_thread() -> bool:
    # Math-Verify times out with signal.alarm, which only works in the main thread
    # (Math-Verify#55); elsewhere it runs without, and the pool's per-call timeout holds.
    return threading.current_thread() is threading.main_thread()


def _parse(latex: str) -> list:
    from math_verify import parse

    delimited = re.search(r"(?<!\\)\$", latex) or "\\boxed" in latex
    text = latex if delimited else f"\\boxed{{{latex}}}"
    return parse(text, parsing_timeout=5 if _in_main_thread() else None)


def _digits(expr) -> float:
    """Rough log10 of |expr| for numbers built from integers, powers, products and factorials."""
    import sympy

    if expr.is_Number:
        value = abs(expr)
        if value == 0:
            return 0.0
        if isinstance(value, sympy.Rational):
            return math.log10(int(value.p)) - math.log10(int(value.q))
        return math.log10(float(value)) if value != sympy.oo else math.inf
    if isinstance(expr, sympy.Pow):
        base, exp = _digits(expr.base), _digits(expr.exp)
        if exp > 300:
            return math.inf if base > 0 else 0.0
        value = float(sympy.N(expr.exp, 15)) if expr.exp.is_number else 0.0
        return max(base * value, 0.0) if not math.isnan(value) else 0.0
    if isinstance(expr, sympy.Mul):
        return sum(max(_digits(a), 0.0) for a in expr.args)
    if isinstance(expr, sympy.Add):
        return max((_digits(a) for a in expr.args), default=0.0)
    if isinstance(expr, sympy.factorial):
        n = _digits(expr.args[0])
        return math.inf if n > 300 else 10**n * max(n, 1.0)
    return 0.0


def _is_huge(parsed: list) -> bool:
    import sympy

    for value in parsed:
        if isinstance(value, sympy.Basic):
            for node in sympy.preorder_traversal(value):
                if isinstance(node, (sympy.Pow, sympy.factorial)) and _digits(node) > HUGE_DIGITS:
                    return True
    return False


def math_equal(reference: str, answer: str) -> bool:
    """Math-Verify's `verify(gold, pred)` (gold first: it is asymmetric) over every parse.

    Raises `VerifierError` when the reference does not parse, or when no pair compared true
    and some comparison failed or timed out.
    """
    from math_verify import verify

    gold = _parse(str(reference))
    if not gold:
        raise VerifierError(f"could not parse the reference {str(reference)[:80]!r}")
    pred = _parse(answer)
    if not pred:
        return False
    if _is_huge(pred) and not _is_huge(gold):
        return False
    timeout = 5 if _in_main_thread() else None
    errors = []
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                    return True
            except BaseException as e:  # math_verify's TimeoutException is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                errors.append(f"{type(e).__name__}: {e}")
    if errors:
        raise VerifierError(f"math_verify failed: {errors[0]}")
    return False


def accuracy_math(completion: str, reference: Any, task: Any = None) -> float:
    """1 if the final answer (`final_answer`) equals the reference (LaTeX, e.g. MATH-500's
    `answer`) by Math-Verify, else 0; no final answer scores 0."""
    answer = final_answer(completion, task)
    if answer is None or not answer.strip():
        return 0.0
    return 1.0 if math_equal(reference, answer) else 0.0


# --- accuracy_gsm8k ------------------------------------------------------------------------

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
FRACTION = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(-?\d+)")
ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def _number(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def _numbers(text: str) -> list[Fraction]:
    """Every number in `text`: `1,000` is one thousand, `\\frac{3}{4}` and `3/4` a fraction;
    `$`, `%` and units around them are ignored."""
    values, spans = [], []
    for m in FRACTION.finditer(text):
        num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if int(den) != 0:
            values.append((m.start(), Fraction(int(num), int(den))))
            spans.append(m.span())
    for m in NUMBER.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            values.append((m.start(), _number(m.group())))
    return [v for _, v in sorted(values, key=lambda x: x[0])]


def gsm8k_reference(reference: Any) -> Fraction:
    """GSM8K's `… #### 72` answer, or a plain number."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return Fraction(str(reference))
    text = str(reference).rsplit("####", 1)[-1]
    numbers = _numbers(text)
    if len(numbers) != 1:
        raise VerifierError(f"the reference {str(reference)[-80:]!r} does not end in one number")
    return numbers[0]


def gsm8k_answer(completion: str, task: Any = None) -> Fraction | None:
    """The predicted number: the boxed / `<answer>` one, else after `####`, else after
    "the answer is", else the last number of the answer part. A boxed or tagged answer with
    several numbers (`\\boxed{71, 72}`) is no answer: a list is not a guess at each."""
    tagged = final_answer(completion, task)
    if tagged is not None:
        numbers = _numbers(tagged)
        return numbers[0] if len(numbers) == 1 else None
    if _meta(task).get("answer_tag"):
        return None
    _, answer = split_think(completion)
    for marker in (re.compile("####"), ANSWER_IS):
        hits = list(marker.finditer(answer))
        if hits:
            numbers = _numbers(answer[hits[-1].end() :])
            return numbers[0] if numbers else None
    numbers = _numbers(answer)
    return numbers[-1] if numbers else None


def accuracy_gsm8k(completion: str, reference: Any, task: Any = None) -> float:
    """1 if the predicted number (`gsm8k_answer`) equals the reference exactly, else 0."""
    gold = gsm8k_reference(reference)
    pred = gsm8k_answer(completion, task)
    return 1.0 if pred is not None and pred == gold else 0.0


# --- format_think --------------------------------------------------------------------------

R1_TEMPLATE = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<rest>.*)", re.DOTALL)
ANSWER_ONLY = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def format_think(completion: str, reference: Any = None, task: Any = None) -> float:
    """1 if the completion follows the R1-Zero template, else 0: exactly one non-empty
    `<think>…</think>` first, then a non-empty answer; with `task.meta["answer_tag"]` the
    answer is exactly one `<answer>…</answer>` block and nothing else."""
    m = R1_TEMPLATE.fullmatch(completion)
    if m is None or completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return 0.0
    rest = m["rest"]
    if not m["think"].strip() or not rest.strip():
        return 0.0
    opens, closes = rest.count("<answer>"), rest.count("</answer>")
    if _meta(task).get("answer_tag"):
        a = ANSWER_ONLY.fullmatch(rest)
        return 1.0 if a and opens == closes == 1 and a["answer"].strip() else 0.0
    if opens or closes:
        ok = opens == closes == 1 and rest.index("<answer>") < rest.index("</answer>")
        return 1.0 if ok else 0.0
    return 1.0


# --- language_consistency ------------------------------------------------------------------

LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{
        lang: frozenset({"LATIN"})
        for lang in "en fr de es it pt nl sv da no fi pl cs tr id vi".split()
    },
    **{lang: frozenset({"CYRILLIC"}) for lang in "ru uk bg sr be kk".split()},
    "zh": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL"}),
    "el": frozenset({"GREEK"}),
    "ar": frozenset({"ARABIC"}),
    "fa": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "hi": frozenset({"DEVANAGARI"}),
    "th": frozenset({"THAI"}),
}
"""Target language -> the scripts its words are written in."""
ONE_WORD_PER_CHAR = frozenset({"CJK", "HIRAGANA", "KATAKANA"})
"""Scripts written without spaces: each character counts as a word."""
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def _script(ch: str) -> str | None:
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    if name.startswith("FULLWIDTH LATIN"):
        return "LATIN"
    if name.startswith("CJK"):
        return "CJK"
    return name.split(" ", 1)[0] or None


def script_words(text: str) -> list[str]:
    """The script of each word in `text` (runs of letters in one script; LaTeX commands and
    lone Greek letters, i.e. math symbols, are not words)."""
    words: list[str] = []
    run_script, run_len = None, 0

    def close():
        if run_script is not None and not (run_script == "GREEK" and run_len == 1):
            words.append(run_script)

    for ch in LATEX_COMMAND.sub(" ", text):
        script = _script(ch)
        if script is not None and script in ONE_WORD_PER_CHAR:
            close()
            words.append(script)
            run_script, run_len = None, 0
        elif script == run_script and script is not None:
            run_len += 1
        else:
            close()
            run_script, run_len = script, 1
    close()
    return words


def language_consistency(completion: str, reference: Any = None, task: Any = None) -> float:
    """Share of the chain of thought's words written in the target language's script
    (`task.meta["language"]`, default `en`); the whole completion if there are no think tags.
    No words at all scores 0. Script-based: it tells English from Chinese, not from French."""
    language = _meta(task).get("language", "en")
    if language not in LANGUAGE_SCRIPTS:
        raise VerifierError(f"no script known for language {language!r}")
    thought, answer = split_think(completion)
    words = script_words(answer if thought is None else thought)
    if not words:
        return 0.0
    return sum(w in LANGUAGE_SCRIPTS[language] for w in words) / len(words)


# --- the registry and the total ------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {
    "accuracy_math": accuracy_math,
    "accuracy_gsm8k": accuracy_gsm8k,
    "format_think": format_think,
    "language_consistency": language_consistency,
    "code_tests": code_tests,
}
"""Reward functions by the name a task uses in its `rewards` dict."""


def check_rewards(rewards: dict[str, float]) -> None:
    """Raise ValueError for an empty dict or a name that is not in `REWARDS`."""
    if not rewards:
        raise ValueError("no rewards named")
    unknown = sorted(set(rewards) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")


def score_completion(
    completion: str, reference: Any, rewards: dict[str, float], task: Any = None
) -> tuple[float | None, dict[str, float | None], str | None]:
    """(total, components, error): total = Σ weight × component over `rewards`.

    Every component is kept; one that raises leaves its component None, the total None and
    the reason in `error` (all reasons, `; `-joined). An unknown name is an error too.
    """
    components: dict[str, float | None] = {}
    errors = []
    for name in rewards:
        fn = REWARDS.get(name)
        try:
            if fn is None:
                raise VerifierError(f"unknown reward; known: {sorted(REWARDS)}")
            components[name] = float(fn(completion, reference, task))
        except VerifierError as e:
            components[name] = None
            errors.append(f"{name}: {e}")
        except Exception as e:  # a bug in a verifier is still no reward, and is reported
            components[name] = None
            errors.append(f"{name}: {type(e).__name__}: {e}")
    if errors:
        return None, components, "; ".join(errors)
    return sum(rewards[n] * components[n] for n in rewards), components, None
