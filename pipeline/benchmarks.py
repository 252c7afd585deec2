"""The evaluation sets aha ships (the files in `pipeline/data/`, provenance in its
README) and, for each, how a row becomes a problem: its id, its text in the prompt template,
the reference its rewards compare with, and how its answers vote (`pipeline.metrics`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from protocol.config import ConfigError

DATA = Path(__file__).with_name("data")
"""Where the benchmark files are (shipped as package data)."""

HUMANEVAL_TASK = (
    "Complete the following Python function. Give the whole function, with its imports, in "
    "one ```python code block.\n\n```python\n{prompt}```"
)
"""HumanEval's problem text around its `prompt` (a signature and docstring): `code_tests` runs
the last ```python block of the answer."""

Vote = Literal["math", "number"]
"""How a benchmark's answers vote for cons@k: `math` is the final answer (`\\boxed{}` or
`<answer>`) with equivalent ones grouped by Math-Verify (`1/2`, `0.5`, `\\frac12` are one
vote); `number` is GSM8K's predicted number, grouped by value."""


@dataclass(frozen=True)
class Problem:
    """One benchmark row, ready to prompt and to score."""

    id: str
    text: str
    """The problem as the benchmark states it (before the template)."""
    reference: Any
    """What the benchmark's rewards compare with."""


def _number_text(value: Any) -> str:
    """AMC's answers are JSON floats (`27.0`): written as the integer they are."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Benchmark:
    """A shipped evaluation set: its file and how to read, prompt and score it."""

    name: str
    """What `--bench` calls it."""
    title: str
    file: str
    """Its file in `pipeline/data/`."""
    rows: int
    """How many problems it has (checked when it is read)."""
    id_field: str | None
    """The field with the problem's id; None: the row number from 0."""
    text: Callable[[dict], str]
    """The problem text of a row."""
    reference: Callable[[dict], Any]
    """The reference of a row, as its rewards read it."""
    rewards: dict[str, float]
    """Reward name -> weight, as in `Task.rewards`; the first is the accuracy reward."""
    vote: Vote | None
    """How answers vote for cons@k; None: no answer to vote on (code)."""
    template: str = "r1-zero"
    """The prompt template, as `pipeline.prompts.render_prompt` names it."""

    @property
    def path(self) -> Path:
        return DATA / self.file

    @property
    def accuracy(self) -> str:
        """The reward whose 1 makes a sample correct."""
        return next(iter(self.rewards))

    def problems(self) -> list[Problem]:
        """Every row as a `Problem`, in file order."""
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != self.rows:
            raise ValueError(f"{self.path}: {len(rows)} rows, expected {self.rows}")
        return [
            Problem(
                id=str(i if self.id_field is None else row[self.id_field]),
                text=self.text(row),
                reference=self.reference(row),
            )
            for i, row in enumerate(rows)
        ]

    def prompt(self, problem: Problem, tokenizer=None) -> str:
        """The prompt the policy sees, rendered as the learner's dispatcher renders it."""
        from pipeline.prompts import render_prompt

        return render_prompt(problem.text, self.template, tokenizer)

    def check_reference(self, reference: Any) -> None:
        """Raise ValueError when `reference` is not one this benchmark's rewards can read."""
        if self.vote is None:
            if not isinstance(reference, dict) or not all(
                isinstance(reference.get(key), str) for key in ("entry_point", "test")
            ):
                raise ValueError(
                    "reference: code_tests needs an object with entry_point and test strings"
                )
        elif isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
            raise ValueError(f"reference: {self.name} needs a string or a number")


MATH = {"accuracy_math": 1.0}
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            name="gsm8k",
            title="GSM8K (test)",
            file="gsm8k_test.jsonl",
            rows=1319,
            id_field=None,
            text=lambda row: row["question"],
            reference=lambda row: row["answer"],  # the worked solution: `#### N` at its end
            rewards={"accuracy_gsm8k": 1.0},
            vote="number",
        ),
        Benchmark(
            name="math500",
            title="MATH-500",
            file="math500_test.jsonl",
            rows=500,
            id_field="unique_id",
            text=lambda row: row["problem"],
            reference=lambda row: row["answer"],
            rewards=MATH,
            vote="math",
        ),
        Benchmark(
            name="aime24",
            title="AIME 2024",
            file="aime24_test.jsonl",
            rows=30,
            id_field="id",
            text=lambda row: row["problem"],
            reference=lambda row: row["answer"],  # `025`: Math-Verify reads it as 25
            rewards=MATH,
            vote="math",
        ),
        Benchmark(
            name="amc23",
            title="AMC 2023",
            file="amc23_test.jsonl",
            rows=40,
            id_field="id",
            text=lambda row: row["problem"],
            reference=lambda row: _number_text(row["answer"]),
            rewards=MATH,
            vote="math",
        ),
        Benchmark(
            name="humaneval",
            title="HumanEval",
            file="humaneval.jsonl",
            rows=164,
            id_field="task_id",
            text=lambda row: HUMANEVAL_TASK.format(prompt=row["prompt"]),
            # the prompt runs in the checker before the tests (HumanEval/32's `poly`)
            reference=lambda row: {
                "entry_point": row["entry_point"],
                "test": row["test"],
                "prompt": row["prompt"],
            },
            rewards={"code_tests": 1.0},
            vote=None,
        ),
    ]
}
"""The shipped benchmarks by name."""


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; `ConfigError` listing the known ones otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(
            f"--bench: no benchmark {name!r}; known: {', '.join(BENCHMARKS)}"
        ) from None
