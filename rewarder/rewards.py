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

A reward raises `Disqualified` for a 0 decided by a rule whose reason is worth recording (an
answer too long to be one, a completion that stalled the verifier by itself, a hedge). A
completion must not be able to turn its 0 into "no reward" (left out of the advantage) by
stalling the verifier, so every extraction here is linear in the completion, and Math-Verify
only ever sees a final answer of at most `MAX_ANSWER_CHARS`, within `ANSWER_BUDGET_S` (issue 10).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

from rewarder.code import code_tests, configure_sandbox, extract_program  # noqa: F401
from rewarder.completion import THINK_CLOSE, THINK_OPEN, split_think
from rewarder.errors import Disqualified, VerifierError

RewardFn = Callable[[str, Any, Any], float]

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
BRACE = re.compile(r"[{}]")
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
HUGE_DIGITS = 100_000
"""A numeric sub-expression with more decimal digits than this is not a final answer (9^{9^9}):
it scores 0 instead of hanging the verifier, unless the reference is itself that huge."""
MAX_ANSWER_CHARS = 1_000
"""A final answer longer than this is not one (MATH-500's longest is 53 characters): it scores
0 with its reason instead of reaching Math-Verify, whose parser is super-linear."""
MAX_ANSWER_BUDGET_S = 10
ANSWER_BUDGET_S = MAX_ANSWER_BUDGET_S
"""Math-Verify's time for one predicted answer, parsing and comparing (every side of an
equation). An answer that uses it up scores 0: the reference verified against itself, so the
stall is the completion's. A pool worker lowers it to a third of the pool's per-call timeout
(`fit_answer_budget`), so that the stall is a 0 before the timeout makes it no reward."""
APPROXIMATE = re.compile(r"\\(?:approx|thickapprox|approxeq|simeq)(?![A-Za-z])|≈")
"""An approximation sign: such an answer is not an exact one, unless the reference has one too."""
PERCENT = re.compile(r"\\?%")
"""A percent sign, dropped from answer and reference alike: `5\\%` is the number 5."""
EQUALS = re.compile(r"(?<![<>!:=])=(?!=)")
"""An equality sign (not in `<=`, `>=`, `!=`, `:=`, `==`)."""
SEPARATOR = re.compile(r"\\text\{\s*(?:or|and)\s*\}|\\q?quad(?![A-Za-z])|;|\bor\b|\band\b")
"""What separates the items of a list answer, besides a comma."""
ITEM_COMMA = re.compile(r"(?<!\d),|,(?!\d{3}(?!\d))")
"""A comma between items, not one grouping thousands (`1,000`)."""
DOLLAR = re.compile(r"(?<!\\)\$")


def _meta(task: Any) -> dict[str, Any]:
    return dict(getattr(task, "meta", None) or {})


# --- where the answer is -------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` (or `\\fbox{…}`), nested braces allowed.

    One pass: every `{` is paired with its `}` on a stack, then the last `\\boxed{` whose
    brace closes wins. (Counting braces again from each `\\boxed{` was quadratic: 20,000
    unclosed ones stalled the verifier past its timeout.)
    """
    opens = [m.end() - 1 for m in BOXED.finditer(text)]  # where each boxed's `{` is
    if not opens:
        return None
    closing: dict[int, int] = {}  # `{` position -> its `}` position
    stack: list[int] = []
    for m in BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    for start in reversed(opens):
        if start in closing:
            return text[start + 1 : closing[start]]
    return None


def last_answer_block(text: str) -> str | None:
    """Content of the last closed `<answer>…</answer>`: the last `<answer>` that some
    `</answer>` follows, up to the first one after it; None if there is none.

    `str.rfind`, so linear (a lazy regex rescanned the rest of the text from every unclosed
    `<answer>`: quadratic).
    """
    close = text.rfind(ANSWER_CLOSE)
    start = text.rfind(ANSWER_OPEN, 0, close) if close >= 0 else -1
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    return text[start : text.find(ANSWER_CLOSE, start)]


def final_answer(completion: str, task: Any = None) -> str | None:
    """The final answer: inside the last closed `<answer>` block (its last `\\boxed{}` if it has
    one, else its text), else the last `\\boxed{}`; only after the chain of thought.

    With `task.meta["answer_tag"]` only an `<answer>` block counts.
    """
    _, answer = split_think(completion)
    block = last_answer_block(answer)
    if block is not None:
        boxed = last_boxed(block)
        return boxed if boxed is not None else block.strip()
    if _meta(task).get("answer_tag"):
        return None
    return last_boxed(answer)


# --- accuracy_math -------------------------------------------------------------------------


def _in_main_thread() -> bool:
    # Math-Verify times out with signal.alarm, which only works in the main thread
    # (Math-Verify#55); elsewhere it runs without, and the pool's per-call timeout holds.
    return threading.current_thread() is threading.main_thread()


def _parse(latex: str, timeout_s: int | None) -> list:
    """Math-Verify's parse of `latex` (boxed first unless it is delimited); raises on an error or
    a timeout instead of returning []: the callers tell whose fault it is."""
    from math_verify import parse

    delimited = DOLLAR.search(latex) or "\\boxed" in latex
    text = latex if delimited else f"\\boxed{{{latex}}}"
    return parse(text, parsing_timeout=timeout_s, raise_on_error=True)


def fit_answer_budget(timeout_s: float) -> None:
    """Fit `ANSWER_BUDGET_S` to a per-call timeout of `timeout_s`: a third of it in whole
    seconds, from 1 to `MAX_ANSWER_BUDGET_S` (the rest is for the reference and the other
    rewards)."""
    global ANSWER_BUDGET_S
    ANSWER_BUDGET_S = max(1, min(MAX_ANSWER_BUDGET_S, int(timeout_s / 3)))


def _seconds_left(deadline: float) -> int | None:
    """Whole seconds for Math-Verify's `signal.alarm` until `deadline`; None outside the main
    thread (see `_in_main_thread`). Raises `Disqualified` when the budget is spent."""
    if not _in_main_thread():
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise Disqualified(f"verifying the answer took over {ANSWER_BUDGET_S} s")
    return max(1, int(left))


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


@functools.lru_cache(maxsize=256)
def _gold(reference: str) -> tuple[list, bool]:
    """(Math-Verify's parse of `reference`, whether it is huge), once per reference.

    Raises `VerifierError` unless the reference parses and every parse compares equal to itself
    in time: only then is a failure on a predicted answer the prediction's doing.
    """
    from math_verify import verify
    from math_verify.utils import timeout as within

    timeout = 5 if _in_main_thread() else None
    try:
        gold = _parse(reference, timeout)
        fine = bool(gold) and all(
            verify(g, g, timeout_seconds=timeout, raise_on_error=True) for g in gold
        )
        huge = within(timeout)(_is_huge)(gold)
    except BaseException as e:  # math_verify's TimeoutException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise VerifierError(
            f"could not parse the reference {reference[:80]!r}: {type(e).__name__}: {e}"
        ) from e
    if not fine:
        raise VerifierError(f"could not parse the reference {reference[:80]!r}")
    return gold, huge


def _matches(
    gold: list, gold_huge: bool, answer: str, deadline: float, against: str = "the reference"
) -> bool:
    """Math-Verify's `verify(gold, pred)` (gold first: it is asymmetric) over every parse of
    `answer`; raises `Disqualified` when `answer` stalls or breaks it."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        pred = _parse(answer, _seconds_left(deadline))
    except TimeoutException as e:
        raise Disqualified("parsing the answer timed out") from e
    except Exception:
        return False  # not mathematics: a wrong answer
    if not pred:
        return False
    if _huge_in_time(pred, deadline) and not gold_huge:
        raise Disqualified(f"the answer has a number of over {HUGE_DIGITS:,} digits")
    errors = []
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=_seconds_left(deadline), raise_on_error=True):
                    return True
            except TimeoutException as e:
                raise Disqualified(f"comparing the answer with {against} timed out") from e
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
    if errors:
        raise Disqualified(f"the answer broke the comparison: {errors[0][:200]}")
    return False


def _equations(latex: str) -> list[list[str]]:
    """The sides of each item of `latex`, split at `=` and items at `,` (`ITEM_COMMA`), `;`,
    "or", "and" outside brackets: `a = 2, b = 3` -> [["a ", " 2"], [" b ", " 3"]]."""
    text = SEPARATOR.sub(",", latex)
    items, sides, depth, start = [], [], 0, 0
    for m in re.finditer(r"[{(\[]|[})\]]|" + ITEM_COMMA.pattern + "|" + EQUALS.pattern, text):
        if m.group() in "{([":
            depth += 1
        elif m.group() in "})]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            sides.append(text[start : m.start()])
            start = m.end()
            if m.group() == ",":
                items.append(sides)
                sides = []
    return [*items, [*sides, text[start:]]]


def _names_unknown(side: str) -> bool:
    """Whether an equation's left side names what is asked (`x`, `f(3)`, `a+b`): a letter that
    is not part of a LaTeX command."""
    return re.search(r"[A-Za-z]", LATEX_COMMAND.sub("", side)) is not None


def _check_sides_agree(values: list[str], deadline: float) -> None:
    """Raise `Disqualified` unless every side in `values` equals the last by Math-Verify."""
    from math_verify.errors import TimeoutException

    try:
        last = _parse(values[-1], _seconds_left(deadline))
    except TimeoutException as e:
        raise Disqualified("parsing the answer timed out") from e
    except Exception:
        last = []
    huge = bool(last) and _huge_in_time(last, deadline)
    if not last or not all(
        _matches(last, huge, side, deadline, "its last side") for side in values[:-1]
    ):
        shown = "=".join(values).strip()
        raise Disqualified(f"the sides of {shown[:80]!r} are not all equal")


def _huge_in_time(parsed: list, deadline: float) -> bool:
    """`_is_huge` within the answer's budget: sympy's numeric evaluation of an exponent
    (`2^{\\prod_{k=1}^{3000} …}`) can take minutes."""
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    try:
        return timeout(_seconds_left(deadline))(_is_huge)(parsed)
    except TimeoutException as e:
        raise Disqualified("sizing the numbers of the answer timed out") from e


def math_equal(reference: str, answer: str) -> bool:
    """Whether `answer` equals `reference` by Math-Verify, with these rules on top:

    - an answer of over `MAX_ANSWER_CHARS`, or one that stalls (`ANSWER_BUDGET_S`) or breaks
      Math-Verify while the reference does not, raises `Disqualified` (a 0 with its reason);
    - `\\approx` (`≈`, `\\simeq`): not an exact answer, `Disqualified` (unless the reference
      has one). Math-Verify drops the sign: `5 \\approx 7` was 5;
    - a percent sign is notation, not /100: `5\\%` equals 5 and `5\\%`, not 0.05 (and
      `0.05` does not equal `5\\%`). Math-Verify took `5\\%` as both 5 and 0.05, one answer
      covering two values;
    - every side of an equation must be equal, but a first side that names the unknown:
      `x = 2+3 = 5` is 5, while `x = 6 = 5` and `5 = 6` are `Disqualified`. Math-Verify
      compared only the last side, so a policy could cover several guesses with
      `x = 1 = 2 = 5`. Each item of a list is one equation (`a = 2, b = 3` is (2, 3)).

    Raises `VerifierError` when the reference does not parse or compare with itself.
    """
    reference = PERCENT.sub("", str(reference))
    gold, gold_huge = _gold(reference)
    if len(answer) > MAX_ANSWER_CHARS:
        raise Disqualified(
            f"the final answer is {len(answer):,} characters long (the limit is "
            f"{MAX_ANSWER_CHARS:,}): not a final answer"
        )
    if APPROXIMATE.search(answer) and not APPROXIMATE.search(reference):
        raise Disqualified("an approximate answer (\\approx) is not an exact one")
    answer = PERCENT.sub("", answer)
    deadline = time.monotonic() + ANSWER_BUDGET_S
    for sides in _equations(DOLLAR.sub(" ", answer)):
        values = sides[1:] if len(sides) > 1 and _names_unknown(sides[0]) else sides
        if len(values) > 1:
            _check_sides_agree(values, deadline)
    return _matches(gold, gold_huge, answer, deadline)


def accuracy_math(completion: str, reference: Any, task: Any = None) -> float:
    """1 if the final answer (`final_answer`) equals the reference (LaTeX, e.g. MATH-500's
    `answer`) by `math_equal`, else 0; no final answer scores 0."""
    answer = final_answer(completion, task)
    if answer is None or not answer.strip():
        return 0.0
    return 1.0 if math_equal(reference, answer) else 0.0


# --- accuracy_gsm8k ------------------------------------------------------------------------

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
FRACTION = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|(-?(?<!\d)\d+)\s*/\s*(-?\d+)")
"""`(?<!\\d)`: a numerator starts where its digits do. Without it every position in a run of n
digits was tried, and each gave its digits back one by one looking for `/`: O(n²)."""
ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)
MAX_NUMBER_CHARS = 100
"""A number written with more characters than this is no GSM8K answer (Python would not even
read one of over 4,300 digits): as the prediction it scores 0 with its reason."""


Number = str | tuple[str, str]
"""A number as written: a token (`1,000`, `-2.5`) or a fraction's (numerator, denominator)."""


def _numbers(text: str) -> list[Number]:
    """Every number in `text`, in order: `1,000` is one thousand, `\\frac{3}{4}` and `3/4` a
    fraction; `$`, `%` and units around them are ignored. Read only the ones used (`_value`):
    a completion can hold hundreds of thousands."""
    found: list[tuple[int, Number]] = []
    spans = []
    for m in FRACTION.finditer(text):
        num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if den.lstrip("-").strip("0"):  # x/0 is no fraction: its numbers count on their own
            found.append((m.start(), (num, den)))
            spans.append(m.span())
    # numbers outside every fraction: both are in text order, so one pointer walks the spans
    i = 0
    for m in NUMBER.finditer(text):
        while i < len(spans) and spans[i][1] <= m.start():
            i += 1
        if i == len(spans) or m.start() < spans[i][0]:
            found.append((m.start(), m.group()))
    found.sort(key=lambda x: x[0])
    return [number for _, number in found]


def _value(number: Number) -> Fraction | None:
    """The value of a number as written; None when it is longer than `MAX_NUMBER_CHARS`."""
    tokens = [number] if isinstance(number, str) else list(number)
    tokens = [t.replace(",", "") for t in tokens]
    if any(len(t) > MAX_NUMBER_CHARS for t in tokens):
        return None
    values = [Fraction(t) for t in tokens]
    return values[0] if len(values) == 1 else values[0] / values[1]


def _read(number: Number) -> Fraction:
    """`_value`, where a number too long to read is the completion's 0 (`Disqualified`)."""
    value = _value(number)
    if value is None:
        raise Disqualified(f"the predicted number is over {MAX_NUMBER_CHARS} characters long")
    return value


def gsm8k_reference(reference: Any) -> Fraction:
    """GSM8K's `… #### 72` answer, or a plain number."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return Fraction(str(reference))
    text = str(reference).rsplit("####", 1)[-1]
    numbers = _numbers(text)
    value = _value(numbers[0]) if len(numbers) == 1 else None
    if value is None:
        raise VerifierError(f"the reference {str(reference)[-80:]!r} does not end in one number")
    return value


def gsm8k_answer(completion: str, task: Any = None) -> Fraction | None:
    """The predicted number: the boxed / `<answer>` one, else after `####`, else after
    "the answer is", else the last number of the answer part. A boxed or tagged answer with
    several numbers (`\\boxed{71, 72}`) is no answer: a list is not a guess at each. Raises
    `Disqualified` when that number is too long to read (`MAX_NUMBER_CHARS`)."""
    tagged = final_answer(completion, task)
    if tagged is not None:
        numbers = _numbers(tagged)
        return _read(numbers[0]) if len(numbers) == 1 else None
    if _meta(task).get("answer_tag"):
        return None
    _, answer = split_think(completion)
    for marker in (re.compile("####"), ANSWER_IS):
        hits = list(marker.finditer(answer))
        if hits:
            numbers = _numbers(answer[hits[-1].end() :])
            return _read(numbers[0]) if numbers else None
    numbers = _numbers(answer)
    return _read(numbers[-1]) if numbers else None


def accuracy_gsm8k(completion: str, reference: Any, task: Any = None) -> float:
    """1 if the predicted number (`gsm8k_answer`) equals the reference exactly, else 0."""
    gold = gsm8k_reference(reference)
    pred = gsm8k_answer(completion, task)
    return 1.0 if pred is not None and pred == gold else 0.0


# --- format_think --------------------------------------------------------------------------


def format_think(completion: str, reference: Any = None, task: Any = None) -> float:
    """1 if the completion follows the R1-Zero template, else 0: exactly one non-empty
    `<think>…</think>` first, then a non-empty answer; with `task.meta["answer_tag"]` the
    answer is exactly one `<answer>…</answer>` block and nothing else."""
    if completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return 0.0
    before, _, after = completion.partition(THINK_OPEN)
    thought, closed, rest = after.partition(THINK_CLOSE)
    if before.strip() or not closed or not thought.strip() or not rest.strip():
        return 0.0
    opens, closes = rest.count(ANSWER_OPEN), rest.count(ANSWER_CLOSE)
    if _meta(task).get("answer_tag"):
        block = rest.strip()
        inner = block[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
        ok = opens == closes == 1 and block.startswith(ANSWER_OPEN) and block.endswith(ANSWER_CLOSE)
        return 1.0 if ok and inner.strip() else 0.0
    if opens or closes:
        ok = opens == closes == 1 and rest.index(ANSWER_OPEN) < rest.index(ANSWER_CLOSE)
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
LETTERS = re.compile(r"[A-Za-z]+|[^\x00-\x7f]+")
"""Runs of ASCII letters (all Latin, no need to look each up) and runs of other characters."""


@functools.lru_cache(maxsize=65_536)
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
    run_script, run_len, run_end = None, 0, 0

    def close():
        if run_script is not None and not (run_script == "GREEK" and run_len == 1):
            words.append(run_script)

    for piece in LETTERS.finditer(LATEX_COMMAND.sub(" ", text)):
        if piece.start() != run_end:  # ASCII non-letters in between end the run
            close()
            run_script, run_len = None, 0
        run_end = piece.end()
        if piece.group()[0].isascii():
            if run_script == "LATIN":
                run_len += len(piece.group())
            else:
                close()
                run_script, run_len = "LATIN", len(piece.group())
            continue
        for ch in piece.group():
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


PLUGIN_SEPARATOR = ":"
"""A reward named `package.module:function` is a plug-in: that function, imported."""


def load_reward(path: str) -> RewardFn:
    """The plug-in reward at `path` (`package.module:function`), imported and checked to take
    `(completion, reference, task)`; ValueError saying what is wrong (one line)."""
    module_name, sep, attr = path.partition(PLUGIN_SEPARATOR)
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"{path!r} is not package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # its import raising anything is a plug-in that does not load
        raise ValueError(f"{path}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{path}: {module_name} has no function {attr}")
    try:
        inspect.signature(fn).bind("completion", "reference", None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: does not take (completion, reference, task): {e}") from e
    return fn


def load_plugins(paths: list[str]) -> None:
    """Import the plug-in rewards at `paths` into `REWARDS` under those names (a rewarder and
    each of its verifier workers, at start). Tasks naming any other import path get no reward
    ("unknown reward"): a task never makes a rewarder import anything."""
    for path in paths:
        if path not in REWARDS:
            REWARDS[path] = load_reward(path)


def check_rewards(rewards: dict[str, float]) -> None:
    """Raise ValueError for an empty dict or a name that is not in `REWARDS` (built in, or a
    plug-in loaded by `load_plugins`)."""
    if not rewards:
        raise ValueError("no rewards named")
    unknown = sorted(set(rewards) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")


class Grade(NamedTuple):
    """A completion's rewards (what a `protocol.messages.Score` carries) and why a component
    is 0 by a rule."""

    reward: float | None
    """Σ weight × component; None when a verifier could not decide."""
    components: dict[str, float | None]
    """Each reward before weighting; None where its verifier could not decide."""
    error: str | None
    """Why `reward` is None (`name: reason`, `; `-joined); None otherwise."""
    note: str | None
    """Why a component is 0 by a rule (`Disqualified`: `name: reason`, `; `-joined); None
    when none is."""


def grade(completion: str, reference: Any, rewards: dict[str, float], task: Any = None) -> Grade:
    """Every reward in `rewards` on `completion`, their weighted total and the reasons.

    Every component is kept; one that raises `VerifierError` (or has a bug) leaves its
    component None, the total None and the reason in `error`; one that raises `Disqualified`
    is 0 with the reason in `note`. An unknown name is an error too.
    """
    components: dict[str, float | None] = {}
    errors, notes = [], []
    for name in rewards:
        fn = REWARDS.get(name)
        try:
            if fn is None:
                raise VerifierError(f"unknown reward; known: {sorted(REWARDS)}")
            components[name] = float(fn(completion, reference, task))
        except Disqualified as e:
            components[name] = 0.0
            notes.append(f"{name}: {e}")
        except VerifierError as e:
            components[name] = None
            errors.append(f"{name}: {e}")
        except Exception as e:  # a bug in a verifier is still no reward, and is reported
            components[name] = None
            errors.append(f"{name}: {type(e).__name__}: {e}")
    note = "; ".join(notes) or None
    if errors:
        return Grade(None, components, "; ".join(errors), note)
    return Grade(sum(rewards[n] * components[n] for n in rewards), components, None, note)
