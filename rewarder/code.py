"""`code_tests`: the program in a completion, run in the sandbox against a task's tests."""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any

from rewarder.completion import split_think
from rewarder.errors import Disqualified, VerifierError
from rewarder.sandbox import Checker, RunResult, SandboxConfig, run_program, run_python

FENCE = "```"
PYTHON_TAGS = ("", "python", "py", "python3")
LANGUAGE = re.compile(r"[ \t]*([\w+-]*)")
HARNESS = Path(__file__).parent / "harness"
_sandbox_limits = SandboxConfig()
_budget_s: float | None = None
"""All of one completion's sandboxed runs together, in seconds (`fit_code_budget`)."""


def configure_sandbox(limits: SandboxConfig) -> None:
    """Set the limits `code_tests` runs programs under in this process (one per pool worker)."""
    global _sandbox_limits
    _sandbox_limits = limits


def fit_code_budget(timeout_s: float) -> None:
    """Fit the time all of one completion's runs may take to a per-call timeout of
    `timeout_s` (half of it): a program that hangs on every case is a 0 before the verifier
    pool's timeout would make it "no reward", which escapes the 0 (a stalled verifier)."""
    global _budget_s
    _budget_s = timeout_s / 2


def _limits(deadline: float | None) -> SandboxConfig:
    """The sandbox limits for the next run: the wall time cut to what the budget has left."""
    if deadline is None:
        return _sandbox_limits
    left = deadline - time.monotonic()
    if left >= _sandbox_limits.wall_seconds:
        return _sandbox_limits
    return _sandbox_limits.model_copy(update={"wall_seconds": max(left, 0.05)})


def _deadline() -> float | None:
    return None if _budget_s is None else time.monotonic() + _budget_s


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of every closed ``` block, in one pass (no regex backtracking:
    a completion of a million backticks costs what its length costs)."""
    blocks, i = [], 0
    while (start := text.find(FENCE, i)) != -1:
        eol = text.find("\n", start + len(FENCE))
        if eol == -1:
            break
        end = text.find(FENCE, eol + 1)
        if end == -1:
            break
        language = LANGUAGE.match(text, start + len(FENCE), eol)
        blocks.append((language[1] if language else "", text[eol + 1 : end]))
        i = end + len(FENCE)
    return blocks


def extract_program(completion: str) -> str:
    """The last ```python (or untagged) block of the answer part, else the whole answer part."""
    _, answer = split_think(completion)
    blocks = [code for lang, code in code_blocks(answer) if lang.lower() in PYTHON_TAGS]
    return blocks[-1] if blocks else answer


@functools.cache
def _harness(name: str) -> str:
    """A sandbox-side program: the wire codec, then the named script (see `rewarder.harness`)."""
    return (HARNESS / "wire.py").read_text() + "\n" + (HARNESS / f"{name}.py").read_text()


def run_tests(program: str, test: str, entry_point: str, setup: str | None = None) -> RunResult:
    """HumanEval-style: `program` defines `entry_point`; `test` defines `check(candidate)`.

    The tests run in a checker process of their own (another uid, see `rewarder.sandbox`):
    `candidate` there is a proxy whose every call is answered by the program's process with
    plain data. `setup` (HumanEval's `prompt`) is trusted code the tests may use, run in the
    checker first: a helper such as HumanEval/32's `poly` comes from it, not from the
    program, which could redefine it.
    """
    limits = _limits(_deadline())
    checker_files = {"main.py": _harness("checker"), "tests.py": test}
    if setup is not None:
        checker_files["setup.py"] = setup
    return run_program(
        {"main.py": _harness("candidate"), "solution.py": program},
        [limits.python, "-I", "main.py", entry_point],
        limits=limits,
        checker=Checker(checker_files, [limits.python, "-I", "main.py", entry_point]),
    )


def _humaneval(program: str, reference: dict) -> float:
    entry_point, test, setup = reference["entry_point"], reference["test"], reference.get("prompt")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise VerifierError(f"code_tests: entry_point {str(entry_point)[:80]!r} is not a name")
    if not isinstance(test, str) or not (setup is None or isinstance(setup, str)):
        raise VerifierError("code_tests: test (and prompt) must be Python source text")
    result = run_tests(program, test, entry_point, setup)
    verdict = (result.verdict or "").strip()
    if verdict.startswith("fault:"):
        raise VerifierError(f"code_tests: {verdict}")
    if result.ok and verdict == "passed":
        return 1.0
    # anything else is the program's doing, a 0: a wrong result (an assertion of the tests)
    # is a plain 0; a hang past the wall time (the checker waits on the program), a crash,
    # an exception or a reply that is not plain data is a 0 with its reason
    if result.timed_out:
        raise Disqualified(f"the program ran past the wall time ({result.seconds:.3g} s)")
    if verdict.startswith("failed: AssertionError"):
        return 0.0
    raise Disqualified(verdict or f"the tests ended without a verdict (exit {result.returncode})")


def _same_output(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""

    def lines(s):
        return [line.rstrip() for line in s.rstrip().splitlines()]

    return lines(got) == lines(expected)


def code_tests(completion: str, reference: Any, task: Any = None) -> float:
    """Run the program (`extract_program`) in the sandbox against the reference's tests.

    `{"entry_point", "test"}` (HumanEval): 1 if `check(entry_point)` passes, else 0.
    `{"inputs": [...], "outputs": [...]}`: the share of cases whose stdout matches.
    """
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError as e:
            raise VerifierError(f"code_tests needs a JSON object as reference: {e}") from e
    if not isinstance(reference, dict):
        raise VerifierError(
            f"code_tests needs an object as reference, got {type(reference).__name__}"
        )
    program = extract_program(completion)
    if "test" in reference and "entry_point" in reference:
        return _humaneval(program, reference)
    inputs, outputs = reference.get("inputs"), reference.get("outputs")
    if (
        not inputs
        or not isinstance(inputs, list)
        or not isinstance(outputs, list)
        or len(inputs) != len(outputs)
        or not all(isinstance(i, str) for i in inputs)
        or not all(isinstance(o, (str, int, float)) for o in outputs)
    ):
        raise VerifierError(
            "code_tests needs {entry_point, test} or equally long non-empty {inputs, outputs}"
            " (inputs text, outputs text or numbers)"
        )
    passed, deadline = 0, _deadline()
    for ran, (stdin, expected) in enumerate(zip(inputs, outputs, strict=True)):
        if deadline is not None and time.monotonic() >= deadline:
            # the cases left count as failed; a program that hung on every one is a 0 that
            # says so, not a timeout of the whole call ("no reward")
            if passed == 0:
                raise Disqualified(
                    f"the time for all cases ({_budget_s:g} s) was spent after {ran} of"
                    f" {len(inputs)}, none passed"
                )
            break
        result = run_python(program, stdin, _limits(deadline))
        passed += result.ok and _same_output(result.stdout, str(expected))
    return passed / len(inputs)
