"""The samples file: what `aha generate` will write and what `aha eval --samples-from` reads.

One JSON line per problem (issue 11, "Machine-readable outputs"):
`{"id", "bench", "prompt", "reference", "samples": [{"text", "n_tokens", "finish_reason",
"reward", "components", "answer", "error", "policy_version"}]}`. Only `id`, `reference` and
each sample's `text` are required; `aha eval` scores every sample again with the benchmark's
rewards, so the score fields a line may carry are read but not trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.config import ConfigError, read_jsonl

LINE = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplesError(ConfigError):
    """A samples file that cannot be used; the message names the file, line and field."""


class Sample(BaseModel):
    """One completion of a problem."""

    model_config = LINE

    text: str
    """The completion as the policy wrote it (after the prompt)."""
    n_tokens: int | None = Field(default=None, ge=0)
    """Its length in tokens; lengths are reported in characters unless every sample has it."""
    finish_reason: str | None = None
    """Why generation stopped: `stop`, or `length` when cut at the token limit."""
    reward: float | None = None
    """The weighted total of the rewards, as the writer scored it (null: undecided)."""
    components: dict[str, float | None] | None = None
    """Each reward before weighting, as the writer scored it."""
    answer: str | None = None
    """The extracted final answer, as the writer saw it."""
    error: str | None = None
    """Why the writer's verifier could not decide."""
    policy_version: int | None = Field(default=None, ge=0)
    """The policy version that sampled it."""


class ProblemSamples(BaseModel):
    """One line: a problem and its samples."""

    model_config = LINE

    id: str
    """The problem's id in its benchmark (a number is read as its text)."""
    bench: str | None = None
    """The benchmark it comes from; when given, it must be the one evaluated."""
    prompt: str | None = None
    """The prompt the samples answer."""
    reference: Any = Field(...)
    """What the benchmark's rewards compare with (MATH-500's `answer`, GSM8K's worked
    solution, HumanEval's `{entry_point, test, prompt}`)."""
    samples: list[Sample] = Field(min_length=1)
    """The completions, in the order they were sampled."""

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _first_error(e: ValidationError) -> str:
    error = e.errors()[0]
    where = ".".join(map(str, error["loc"]))
    return f"{where}: {error['msg']}" if where else error["msg"]


def read_samples(
    path: str | Path,
    k: int | None = None,
    check: Callable[[ProblemSamples], None] | None = None,
) -> list[ProblemSamples]:
    """Every line of a samples file, each with its first `k` samples (all when None).

    Raises `SamplesError` naming the file and line for a line that is not a problem's
    samples, one that `check` raises ValueError for (with its message), an id seen before,
    fewer than `k` samples, or (without `k`) a sample count unlike the first line's.
    """
    path = Path(path)
    problems: list[ProblemSamples] = []
    seen: dict[str, int] = {}
    first: tuple[int, int] | None = None  # (line, samples) of the first line
    for number, row in read_jsonl(path):
        where = f"({path}:{number})"
        try:
            problem = ProblemSamples.model_validate(row)
        except ValidationError as e:
            raise SamplesError(f"{_first_error(e)} {where}") from None
        try:
            if check is not None:
                check(problem)
        except ValueError as e:
            raise SamplesError(f"{e} {where}") from None
        if problem.id in seen:
            raise SamplesError(f"id: {problem.id!r} is also on line {seen[problem.id]} {where}")
        seen[problem.id] = number
        count = len(problem.samples)
        if k is not None:
            if count < k:
                raise SamplesError(f"samples: {count} samples, fewer than --k {k} {where}")
            problem = problem.model_copy(update={"samples": problem.samples[:k]})
        elif first is None:
            first = (number, count)
        elif count != first[1]:
            raise SamplesError(
                f"samples: {count} samples where line {first[0]} has {first[1]}; --k N "
                f"evaluates the first N of each {where}"
            )
        problems.append(problem)
    if not problems:
        raise SamplesError(f"no problems in the samples file ({path})")
    return problems
