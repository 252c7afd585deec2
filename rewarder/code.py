"""`code_tests`: the program in a completion, run in the sandbox against a task's tests."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from rewarder.errors import VerifierError
from rewarder.sandbox import SandboxLimits, run_program, run_python

CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_sandbox_limits = SandboxLimits()


def configure_sandbox(limits: SandboxLimits) -> None:
    """Set the limits `code_tests` runs programs under in this process (one per pool worker)."""
    global _sandbox_limits
    _sandbox_limits = limits


def extract_program(completion: str) -> str:
    """The last ```python (or untagged) block of the answer part, else the whole answer part."""
    from rewarder.rewards import split_think  # rewards.py imports this module

    _, answer = split_think(completion)
    blocks = [
        code
        for lang, code in CODE_BLOCK.findall(answer)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    return blocks[-1] if blocks else answer


# Runs the program, then HumanEval's `check(candidate)`, and prints a nonce only once check
# returned: exit(0) or os._exit(0) before the tests ran do not pass. Builtins are restored
# before the tests, and every result must be plain data (an object whose __eq__ is always
# True must not pass `assert candidate(x) == y`).
HARNESS = r"""
import builtins, sys
_builtins = dict(builtins.__dict__)
_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _plain(value, depth=0):
    if type(value) in _PLAIN:
        return
    if type(value) in (list, tuple, set, frozenset) and depth < 50:
        for item in value:
            _plain(item, depth + 1)
        return
    if type(value) is dict and depth < 50:
        for k, v in value.items():
            _plain(k, depth + 1)
            _plain(v, depth + 1)
        return
    raise TypeError(f"the candidate returned a {type(value).__name__}, not plain data")


def _guard(candidate):
    def guarded(*args, **kwargs):
        result = candidate(*args, **kwargs)
        _plain(result)
        return result
    return guarded


def _main():
    nonce = sys.stdin.readline().strip()  # a local, not a global of __main__
    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
        builtins.__dict__.clear()
        builtins.__dict__.update(_builtins)
        exec(compile(open("tests.py").read(), "tests.py", "exec"), ns)
        ns["check"](_guard(ns[ENTRY_POINT]))
    except BaseException as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.stderr.flush()
        import os
        os._exit(1)
    sys.stdout.flush()
    print(nonce, flush=True)


_main()
"""


def _run_humaneval(program: str, test: str, entry_point: str) -> bool:
    nonce = secrets.token_hex(16)
    files = {
        "main.py": f"ENTRY_POINT = {entry_point!r}\n{HARNESS}",
        "solution.py": program,
        "tests.py": test,
    }
    result = _run(files, nonce + "\n")
    lines = result.stdout.splitlines()
    return result.ok and bool(lines) and lines[-1] == nonce


def _run(files: dict[str, str], stdin: str):
    limits = _sandbox_limits
    return run_program(files, [limits.python, "-I", "main.py"], stdin, limits)


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
        return 1.0 if _run_humaneval(program, reference["test"], reference["entry_point"]) else 0.0
    inputs, outputs = reference.get("inputs"), reference.get("outputs")
    if (
        not inputs
        or not isinstance(inputs, list)
        or not isinstance(outputs, list)
        or len(inputs) != len(outputs)
    ):
        raise VerifierError(
            "code_tests needs {entry_point, test} or equally long non-empty {inputs, outputs}"
        )
    passed = 0
    for stdin, expected in zip(inputs, outputs):
        result = run_python(program, stdin, _sandbox_limits)
        passed += result.ok and _same_output(result.stdout, str(expected))
    return passed / len(inputs)


