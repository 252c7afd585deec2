"""The dispatcher: prompts from a JSONL file become `Task`s, with at most
`(max_staleness + 1) × batch` groups in flight (DESIGN.md, "The loop", step 1).

Everything about a task is a function of its *position* `p` (0, 1, 2, … in issue order):
the dataset row is `permutation(seed, p // n)[p % n]` (a fresh seeded shuffle per pass over
the data) and the task id is `{run_key}-{p}`. A learner restarted from a checkpoint that
holds the next position re-issues the same tasks under the same ids, and the server's
duplicate window drops the repeats.

`Ledger` is the in-flight bookkeeping (pure, no I/O): which positions are out on the bus,
which scored groups the learner holds in a step not yet checkpointed, and which arrivals are
duplicates of groups already committed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learner.config import DatasetConfig
from protocol.messages import Sampling, Task

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
"""DeepSeek-R1-Zero's training template (arXiv:2501.12948, Table 1)."""


@dataclass(frozen=True)
class Problem:
    """One dataset row: the rendered prompt, its tokens and the reference answer."""

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int] | None
    reference: Any


def read_rows(path: str | Path, prompt_field: str, answer_field: str) -> list[tuple[str, Any]]:
    """(problem text, reference) per non-empty JSONL line; a missing field names the line."""
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                rows.append((str(row[prompt_field]), row[answer_field]))
            except KeyError as e:
                raise ValueError(f"{path}:{line_no}: no field {e.args[0]!r}") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def render_prompt(text: str, template: str, tokenizer=None) -> str:
    """The prompt text the policy sees: R1-Zero's template, the chat template, or `text` itself."""
    if template == "r1-zero":
        return R1_ZERO.format(prompt=text)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "none":
        return text
    raise ValueError(f"unknown template {template!r}")


def tokenize_prompt(prompt: str, template: str, tokenizer) -> list[int]:
    """Token ids as the actors' engines would encode the prompt (the chat template already
    carries its special tokens, so none are added to it)."""
    return list(tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"])


def load_problems(dataset: DatasetConfig, tokenizer=None) -> list[Problem]:
    """Read, render and (with a tokenizer) tokenize every row of the dataset once."""
    problems = []
    for i, (text, reference) in enumerate(
        read_rows(dataset.path, dataset.prompt_field, dataset.answer_field)
    ):
        prompt = render_prompt(text, dataset.template, tokenizer)
        ids = tokenize_prompt(prompt, dataset.template, tokenizer) if tokenizer else None
        problems.append(Problem(str(i), prompt, ids, reference))
    return problems


def permutation(seed: int, epoch: int, n: int) -> list[int]:
    """The row order of pass `epoch` over `n` rows: a seeded shuffle, the same on every restart."""
    order = list(range(n))
    random.Random(f"aha-dispatch:{seed}:{epoch}").shuffle(order)
    return order


def run_key(*parts: Any) -> str:
    """A short stable id for a run (task ids are `{run_key}-{position}`)."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:10]


def task_id(key: str, position: int) -> str:
    return f"{key}-{position}"


def task_position(key: str, tid: str) -> int | None:
    """The position encoded in a task id of this run; None for another run's task."""
    prefix, _, number = tid.rpartition("-")
    return int(number) if prefix == key and number.isdigit() else None


@dataclass
class Ledger:
    """Which task positions are in flight, held, or consumed (everything `Ledger.state` saves).

    - `issued`: the next position to issue (positions `< issued` have been published);
    - `outstanding`: issued, no scored group received yet — the groups *in flight*;
    - `held`: received into a step that is not checkpointed yet (acked after the checkpoint);
    - `ahead`: received although not issued yet — a learner that crashed had issued further
      than its checkpoint; the re-issue of such a position is deduplicated by the server, so
      it must not count as in flight again.

    A received position in none of these sets was consumed by a committed step: a duplicate.
    """

    issued: int = 0
    outstanding: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)
    ahead: set[int] = field(default_factory=set)

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def room(self, limit: int) -> int:
        """How many more tasks may be issued under the in-flight `limit`."""
        return max(0, limit - self.in_flight)

    def issue(self) -> int:
        """Take the next position (its scored group may already be here: see `ahead`)."""
        p = self.issued
        self.issued += 1
        if p in self.ahead:
            self.ahead.discard(p)
        else:
            self.outstanding.add(p)
        return p

    def receive(self, p: int) -> str:
        """Account for an arriving scored group: `new`, `held` (redelivered while we hold it)
        or `duplicate` (its consumption is already checkpointed)."""
        if p in self.outstanding:
            self.outstanding.discard(p)
            self.held.add(p)
            return "new"
        if p in self.held:
            return "held"
        if p >= self.issued and p not in self.ahead:
            self.ahead.add(p)
            self.held.add(p)
            return "new"
        return "duplicate"

    def lose(self, p: int) -> bool:
        """A task the loop gave up on (dead-lettered before its group reached us): it is no
        longer in flight. Returns whether it was."""
        if p in self.outstanding:
            self.outstanding.discard(p)
            return True
        return False

    def release(self, p: int) -> None:
        """Give a held group back (not trained, not acked): it is in flight again."""
        self.held.discard(p)
        if p < self.issued:
            self.outstanding.add(p)
        else:
            self.ahead.discard(p)

    def commit(self) -> None:
        """Every held group's effect is now in a checkpoint."""
        self.held.clear()

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves; call it after the groups it commits are no longer pending."""
        if self.held:
            raise RuntimeError("held groups must be committed or released before saving")
        return {
            "issued": self.issued,
            "outstanding": sorted(self.outstanding),
            "ahead": sorted(self.ahead),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Ledger:
        return cls(
            issued=state["issued"],
            outstanding=set(state["outstanding"]),
            ahead=set(state["ahead"]),
        )


class Dispatcher:
    """Builds the task at each position; the ledger decides how many may go out."""

    def __init__(self, dataset: DatasetConfig, problems: list[Problem], key: str):
        self.dataset = dataset
        self.problems = problems
        self.key = key
        self._epoch: int | None = None
        self._order: list[int] = []
        self.sampling = Sampling(
            temperature=dataset.temperature, top_p=dataset.top_p, max_tokens=dataset.max_tokens
        )

    def row(self, position: int) -> int:
        """Dataset row of `position`."""
        epoch, offset = divmod(position, len(self.problems))
        if epoch != self._epoch:
            self._epoch, self._order = (
                epoch,
                permutation(self.dataset.seed, epoch, len(self.problems)),
            )
        return self._order[offset]

    def task(self, position: int, version: int) -> Task:
        problem = self.problems[self.row(position)]
        ids = problem.prompt_token_ids
        return Task(
            task_id=task_id(self.key, position),
            prompt_id=problem.prompt_id,
            prompt=problem.prompt,
            prompt_token_ids=None if ids is None else np.asarray(ids, dtype=np.int32),
            reference=problem.reference,
            rewards=dict(self.dataset.rewards),
            group_size=self.dataset.group_size,
            sampling=self.sampling,
            issued_version=version,
            meta=dict(self.dataset.meta),
        )

    def position(self, tid: str) -> int | None:
        return task_position(self.key, tid)


async def top_up(bus, dispatcher: Dispatcher, ledger: Ledger, limit: int, version: int) -> int:
    """Publish tasks until `limit` groups are in flight; returns how many were published."""
    from protocol.names import TASKS

    count = 0
    while ledger.room(limit) > 0:
        position = ledger.issued
        await bus.publish(TASKS, dispatcher.task(position, version))
        ledger.issue()  # only once the server has it: a failed publish is retried by position
        count += 1
    return count
