"""The built-in demo task: 3-digit addition with a digit-by-digit chain of thought.

    prompt    Q:123+456=
    response  <think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>

Each step adds the digits of one column, from the right, plus the carry coming in, and writes
the column sum; the answer is checked by the same rule-based reward as GSM8K's final number.
Small enough that a 160k-parameter model learns it on a laptop CPU, clear enough to watch
R1-Zero's story: a cold-start model that often answers without thinking learns, from reward
alone, to use the chain (see DEMO.md's measurements).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

DIGITS = 3
REWARDS = {"accuracy_gsm8k": 1.0, "format_think": 0.1}
"""1 for the right answer, 0.1 for the R1-Zero format."""


def prompt(a: int, b: int, digits: int = DIGITS) -> str:
    return f"Q:{a:0{digits}d}+{b:0{digits}d}="


def chain(a: int, b: int, digits: int = DIGITS, drop_carry: float = 0.0, rng=None) -> str:
    """The column-by-column reasoning; with `drop_carry` > 0 some carries are forgotten
    (recipe A's buggy chains), and the chain's own sum follows the mistake."""
    steps, carry = [], 0
    for i in range(digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        if carry and drop_carry and rng.random() < drop_carry:
            carry = 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ",".join(steps)


def answer_of_chain(text: str) -> str:
    """The number a chain adds up to (digits of each column sum, final carry first)."""
    sums = [int(step.rsplit("=", 1)[1]) for step in text.split(",")]
    digits = "".join(str(s % 10) for s in reversed(sums))
    return str(int(("1" if sums[-1] >= 10 else "") + digits))


def response(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def problems(
    seed: int, digits: int = DIGITS, exclude: set[str] = frozenset()
) -> Iterator[tuple[int, int]]:
    """An endless stream of problems, none of whose prompts is in `exclude`."""
    rng = random.Random(seed)
    while True:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if prompt(a, b, digits) not in exclude:
            yield a, b


def held_out(n: int = 500, seed: int = 1_000_003, digits: int = DIGITS) -> list[dict]:
    """The evaluation set: `n` distinct problems, never trained on."""
    rows, seen = [], set()
    for a, b in problems(seed, digits):
        p = prompt(a, b, digits)
        if p not in seen:
            seen.add(p)
            rows.append({"prompt": p, "answer": str(a + b)})
        if len(rows) == n:
            return rows
    raise AssertionError("unreachable")


def cold_start(
    n: int, *, seed: int, exclude: set[str], chain_share: float = 0.4, drop_carry: float = 0.0
) -> list[dict]:
    """SFT pairs for the cold start. Recipe B ("think or guess", the default): `chain_share`
    of them reason, the rest answer straight away after an empty `<think></think>`. Recipe A
    is `chain_share=1, drop_carry=0.8`."""
    rng = random.Random(seed)
    rows = []
    for a, b in problems(seed, exclude=exclude):
        if rng.random() < chain_share:
            think = chain(a, b, drop_carry=drop_carry, rng=rng)
            rows.append(
                {"prompt": prompt(a, b), "response": response(think, answer_of_chain(think))}
            )
        else:
            rows.append({"prompt": prompt(a, b), "response": response("", str(a + b))})
        if len(rows) == n:
            return rows
    raise AssertionError("unreachable")


def rl_prompts(n: int, *, seed: int, exclude: set[str]) -> list[dict]:
    """The RL dataset: prompt + reference answer, in the field names the dispatcher reads."""
    out = []
    for a, b in problems(seed, exclude=exclude):
        out.append({"prompt": prompt(a, b), "answer": str(a + b)})
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
