"""Completions that try to earn `code_tests` without solving the problem: each must score 0.

Every case's `add` is wrong (it returns 0), so a 1.0 could only come from reaching the
verdict. The tests run in a checker process of another uid (see `rewarder.code.run_tests`):
these attacks are aimed at what the old in-process harness exposed (exit paths, frames, gc,
builtins, `__main__`, atexit, signals, stdin, stdout) and at the new boundary (the pipes, the
verdict fd, the checker's process and files, the reply decoder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rewarder.code import code_tests, configure_sandbox, run_tests
from rewarder.rewards import grade
from rewarder.sandbox import SandboxConfig, isolation
from tests.unit.rewarder.leftovers import assert_nothing_left

ADD = {
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
WRONG = "def add(a, b):\n    return 0\n"
FRAME = (  # writes a forged reply frame: 4-byte length + JSON
    "import json, struct\n"
    "def frame(m):\n    b = json.dumps(m).encode()\n    return struct.pack('>I', len(b)) + b\n"
)

HACKS = {
    # leaving early, or making the harness's own exits into no-ops
    "os._exit(0)": "import os\nos._exit(0)\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit()": "exit()\n",
    "raise SystemExit": "raise SystemExit(0)\n",
    "os._exit no-op": "import os\nos._exit = lambda *a: None\n",
    "sys.exit no-op": "import sys, os, builtins\nsys.exit = os._exit = builtins.exit = lambda *a: None\n",
    "SIGKILL self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    # the checker's input, its pass marker, its frames
    "stdin re-read": (
        "import os, sys\nos.lseek(0, 0, 0)\nprint(sys.stdin.read().strip(), flush=True)\nos._exit(0)\n"
    ),
    "caller frames": (
        "import sys, os\ndef add(a, b):\n    f = sys._getframe()\n    while f:\n"
        "        for v in list(f.f_locals.values()):\n"
        "            if isinstance(v, str) and len(v) == 32: print(v, flush=True)\n"
        "        f.f_globals['say'] = print\n        f = f.f_back\n    os._exit(0)\n"
    ),
    "gc patch": (
        "import gc\nfor o in gc.get_objects():\n    if callable(o) and getattr(o, '__name__', '')"
        " in ('check', 'say', 'main', 'decode', '_plain'):\n"
        "        try: o.__code__ = (lambda *a: 'passed').__code__\n"
        "        except Exception: pass\n"
    ),
    "__main__ helpers": (
        "import __main__\nfor name in ('say', 'main', 'check', 'encode', 'error_reply', '_plain'):\n"
        "    setattr(__main__, name, lambda *a, **k: ['ok', ['i', '0x5']])\n"
        "class E:\n    def __eq__(self, o): return True\n"
        "def add(a, b):\n    return E()\n"
    ),
    "builtins patch": (
        "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})\n"
        "builtins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
    ),
    "atexit": "import atexit, os\natexit.register(lambda: os.write(5, b'passed\\n'))\n",
    # the verdict channel and the other process
    "write fd 5": "import os\nfor fd in range(64):\n    try: os.write(fd, b'passed\\n')\n    except OSError: pass\n",
    "stdout marker": "import os\nprint('passed')\nos.write(1, b'passed\\n')\nos.write(2, b'passed\\n')\n",
    "kill everyone": (
        "import os, signal\nfor pid in [-1, 0, 1, os.getppid()] + list(range(2, 64)):\n"
        "    try: os.kill(pid, signal.SIGKILL) if pid > 0 else os.killpg(0, signal.SIGSTOP) if pid == 0 else os.kill(pid, signal.SIGSTOP)\n"
        "    except OSError: pass\n"
    ),
    "proc of the checker": (
        "import os\nfor pid in os.listdir('/proc'):\n    if not pid.isdigit(): continue\n"
        "    for path, mode in [('fd/5', 'w'), ('mem', 'r+b'), ('environ', 'rb'), ('cwd/tests.py', 'r')]:\n"
        "        try:\n            f = open(f'/proc/{pid}/{path}', mode)\n"
        "            print('opened', pid, path)\n            f.write(b'passed\\n' if 'b' in mode else 'passed\\n')\n"
        "        except Exception as e: pass\n"
    ),
    "read the tests": (
        "for path in ['/check/tests.py', '../check/tests.py', '../verdict']:\n"
        "    try: print(open(path).read())\n    except OSError: pass\n"
    ),
    "ptrace the checker": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
        "        print(pid, libc.ptrace(16, int(pid), 0, 0), ctypes.get_errno())\n"
    ),
    "re-exec": "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'print(\"passed\")'])\n",
    # replies: forged frames, objects that equal everything, oversized or deep results
    # (replies forged with the *right* values would be a lookup table of the tests' answers:
    # no checker can tell that from a solution; keep tests hidden and varied)
    "malformed reply frames": FRAME
    + "import os\nos.write(4, frame(['ok', ['E', 'x'], 1]) + frame(['ok', ['i', 'zz']]))\n",
    "lying frame length": "import os, struct\nos.write(4, struct.pack('>I', 1 << 30) + b'[')\n",
    "forged verdict frame": FRAME + "import os\nos.write(4, frame(['passed']))\n",
    "always-equal object": (
        "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
        "def add(a, b):\n    return E()\n"
    ),
    "int subclass": "class I(int):\n    def __eq__(self, o): return True\ndef add(a, b):\n    return I(0)\n",
    "str/list subclass": "class L(list):\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return L()\n",
    "deep result": "def add(a, b):\n    x = []\n    for _ in range(10000): x = [x]\n    return x\n",
    "huge result": "def add(a, b):\n    return 'x' * (20 << 20)\n",
    "raise a name the checker trusts": "def add(a, b):\n    raise StopIteration\n",
    # outliving the call
    "thread after the call": (
        "import threading, os, time\n"
        "def later():\n    time.sleep(0.05)\n    os._exit(0)\n"
        "threading.Thread(target=later).start()\n"
    ),
    "signal handler": "import signal, os\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n",
    "hang": "import time\ntime.sleep(3600)\n",
    "memory for the checker": "x = bytearray(900 << 20)\ny = [bytearray(900 << 20) for _ in range(4)]\n",
}


def score(program: str, reference: dict = ADD) -> float:
    """The `code_tests` reward as the rewarder gives it: a 0 may carry a reason (its note),
    but it is never "no reward" (an error)."""
    result = grade(program, reference, {"code_tests": 1.0})
    assert result.error is None, result.error
    return result.reward


needs_namespaces = pytest.mark.skipif(
    isolation() != "namespaces", reason="needs root and network/PID/mount namespaces (unshare)"
)
LIMITS = SandboxConfig(wall_seconds=3.0, cpu_seconds=3, memory_mb=1024, memory_total_mb=1024)


@pytest.fixture(autouse=True)
def short_limits():
    configure_sandbox(LIMITS)
    yield
    configure_sandbox(SandboxConfig())


@needs_namespaces
@pytest.mark.parametrize("hack", HACKS, ids=list(HACKS))
def test_a_hacking_attempt_scores_zero(hack):
    program = HACKS[hack]
    # before the wrong definition (the attack runs at import) and after it (a redefinition)
    for source in (program + WRONG, WRONG + program):
        assert score(source) == 0.0, hack
    assert_nothing_left()


@needs_namespaces
def test_a_zero_says_why_unless_it_is_a_wrong_result():
    """A failed assertion is a plain 0; a hang, a crash or a reply that is not plain data is a
    0 with its reason (`Disqualified`: never "no reward", which would escape the 0)."""

    def note(program):
        result = grade(program, ADD, {"code_tests": 1.0})
        assert result.reward == 0.0 and result.error is None
        return result.note or ""

    assert note(WRONG) == ""
    assert "wall time" in note(HACKS["hang"])
    assert "defines no add" in note("def sub(a, b):\n    return a - b\n")
    assert "not plain data" in note(HACKS["always-equal object"])
    assert "KeyError" in note("def add(a, b):\n    return {}[a]\n")


@needs_namespaces
def test_a_correct_program_still_passes_beside_noise():
    """The same harness gives 1 to the right answer, whatever the program prints or leaves."""
    noisy = (
        "import sys, threading, time\nprint('passed? no: just output')\n"
        "print('to stderr', file=sys.stderr)\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
        "def add(a, b):\n    print('called', a, b)\n    return a + b\n"
    )
    assert score(noisy) == 1.0
    assert_nothing_left()


@needs_namespaces
def test_what_crosses_the_boundary_keeps_its_type():
    """Results arrive as fresh plain data of exactly their type: a tuple is not a list, 1.0
    is not 1, a set stays a set, floats keep every bit, and exceptions keep builtin names."""
    test = (
        "import math\n"
        "def check(candidate):\n"
        "    assert candidate('tuple') == (1, 'a', None) and type(candidate('tuple')) is tuple\n"
        "    assert candidate('list') != (1, 'a', None)\n"
        "    assert candidate('float') == 0.1 + 0.2 and type(candidate('float')) is float\n"
        "    assert math.isnan(candidate('nan')) and candidate('inf') == math.inf\n"
        "    assert candidate('big') == 3 ** 5000\n"
        "    assert candidate('set') == {1, 2} and type(candidate('set')) is set\n"
        "    assert candidate('dict') == {(1, 2): [b'x', 1j, frozenset([3])]}\n"
        "    assert candidate('bool') is True\n"
        "    try:\n        candidate('raise')\n        assert False\n"
        "    except ValueError as e:\n        assert str(e) == 'no'\n"
        "    assert candidate('kw', extra=[1]) == [1]\n"
    )
    program = (
        "import math\n"
        "def f(kind, extra=None):\n"
        "    return {'tuple': (1, 'a', None), 'list': [1, 'a', None], 'float': 0.1 + 0.2,\n"
        "            'nan': math.nan, 'inf': math.inf, 'big': 3 ** 5000, 'set': {1, 2},\n"
        "            'dict': {(1, 2): [b'x', 1j, frozenset([3])]}, 'bool': True,\n"
        "            'kw': extra}[kind] if kind != 'raise' else (_ for _ in ()).throw(ValueError('no'))\n"
    )
    result = run_tests(program, test, "f")
    assert result.verdict.strip() == "passed", (result.verdict, result.stderr)


@needs_namespaces
def test_broken_tests_are_no_reward_not_a_zero():
    from rewarder.errors import VerifierError

    for test, why in [
        ("def chek(candidate):\n    pass\n", "no check"),
        ("def check(candidate):\n    pass\n", "never called"),
        ("import nonexistent_module\n", "did not load"),
        ("def check(candidate):\n    candidate(lambda: 1)\n", "cannot cross"),
    ]:
        with pytest.raises(VerifierError, match=why):
            code_tests("def add(a, b):\n    return a + b\n", {"entry_point": "add", "test": test})


@needs_namespaces
def test_helpers_of_the_prompt_come_from_the_prompt_not_the_program():
    """HumanEval/32 checks `poly(coeffs, candidate(coeffs))`: a program that redefines `poly`
    to return 0 must not pass when the reference carries the prompt."""
    lines = (Path(__file__).parents[2] / "data" / "humaneval.jsonl").read_text().splitlines()
    row = next(json.loads(line) for line in lines if '"HumanEval/32"' in line)
    reference = {"entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"]}
    good = row["prompt"] + row["canonical_solution"]
    cheat = "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0\n"
    assert score(good, reference) == 1.0
    assert score(cheat, reference) == 0.0


PROCESS_MODE = [
    "os._exit no-op",
    "sys.exit no-op",
    "stdin re-read",
    "caller frames",
    "__main__ helpers",
    "write fd 5",
    "kill everyone",
    "proc of the checker",
    "read the tests",
    "ptrace the checker",
]


@pytest.mark.skipif(os.geteuid() != 0, reason="process isolation drops to the sandbox uids as root")
def test_without_namespaces_the_checker_still_holds():
    """ "process" isolation (a container without CAP_SYS_ADMIN): no chroot, no private /tmp,
    but the checker is still another uid in a directory of its own."""
    configure_sandbox(LIMITS.model_copy(update={"isolation": "process"}))
    assert score("def add(a, b):\n    return a + b\n") == 1.0
    for hack in PROCESS_MODE:
        for source in (HACKS[hack] + WRONG, WRONG + HACKS[hack]):
            assert score(source) == 0.0, hack
    assert_nothing_left(within=5.0)
