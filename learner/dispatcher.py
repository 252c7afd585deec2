"""The dispatcher: prompts from a JSONL file become `Task`s, with at most
`(max_staleness + 1) × batch` groups in flight (DESIGN.md, "The loop", step 1).

Everything about a task is a function of its *position* `p` (0, 1, 2, … in issue order):
the dataset row is `permutation(seed, p // n)[p % n]` (a fresh seeded shuffle per pass over
the data) and the task id is `{run_key}-{p}`. A learner restarted from a checkpoint that
holds the next position re-issues the same tasks under the same ids, and the server's
duplicate window drops the repeats.

`Ledger` is the in-flight bookkeeping (pure, no I/O): which positions are out on the bus,
which scored groups the learner holds in a step not yet checkpointed, which arrivals are
duplicates of groups already committed, and which are foreign (never issued by this run).
Positions are *reserved* in a small file before they are published (`Reservation`), so a
learner restarted after a crash knows how far its predecessor may have issued.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from learner.config import DatasetConfig
from pipeline.prompts import render_prompt, tokenize_prompt
from protocol.messages import Sampling, Task, estimate_scored_bytes

log = structlog.get_logger("learner.dispatcher")


@dataclass(frozen=True)
class Problem:
    """One dataset row: the rendered prompt, its tokens and the reference answer."""

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int] | None
    reference: Any
    rewards: dict[str, float] | None = None
    """The row's own rewards (`learner.datasets`); None: the dataset's."""
    meta: dict[str, Any] | None = None
    """The row's own task meta; None: the dataset's."""


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


def load_problems(dataset: DatasetConfig, tokenizer=None) -> list[Problem]:
    """Read (`learner.datasets`: JSONL, Parquet or Arrow, sources mixed by weight), render and
    (with a tokenizer) tokenize every row once; prompts over `max_prompt_length` left out."""
    from learner.datasets import keep_short, load_rows

    problems = []
    for row in load_rows(dataset):
        prompt = render_prompt(row.text, dataset.template, tokenizer)
        ids = tokenize_prompt(prompt, dataset.template, tokenizer) if tokenizer else None
        problems.append(Problem(row.prompt_id, prompt, ids, row.reference, row.rewards, row.meta))
    return keep_short(problems, dataset.max_prompt_length)


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
      it must not count as in flight again;
    - `reserved`: positions below it may have been published (by this process or one that
      crashed); a group at or above it was never issued by this run: foreign.

    A received position in none of these sets was consumed by a committed step: a duplicate.
    """

    issued: int = 0
    outstanding: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)
    ahead: set[int] = field(default_factory=set)
    reserved: int = 0

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def room(self, limit: int) -> int:
        """How many more tasks may be issued under the in-flight `limit`."""
        return max(0, limit - self.in_flight)

    def issue(self) -> int:
        """Take the next position (its scored group may already be here: see `ahead`)."""
        p = self.issued
        if p >= self.reserved:
            raise RuntimeError(f"position {p} issued before it was reserved")
        self.issued += 1
        if p in self.ahead:
            self.ahead.discard(p)
        else:
            self.outstanding.add(p)
        return p

    def receive(self, p: int) -> str:
        """Account for an arriving scored group: `new`, `held` (redelivered while we hold it),
        `duplicate` (its consumption is already checkpointed) or `foreign` (never issued:
        nothing is recorded)."""
        if p >= self.reserved:
            return "foreign"
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
            "reserved": self.reserved,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], reserved: int = 0) -> Ledger:
        """The saved ledger; `reserved` is the reservation file's (it runs ahead of checkpoints)."""
        return cls(
            issued=state["issued"],
            outstanding=set(state["outstanding"]),
            ahead=set(state["ahead"]),
            reserved=max(reserved, state.get("reserved", state["issued"]), state["issued"]),
        )


@dataclass
class Reservation:
    """The highest position this run may have published, in a file written *before* the
    publish (checkpoints come only after a step, and a crash may fall in between).

    Reserving `chunk` positions at a time keeps it to one small write per `chunk` tasks; it
    runs at most `chunk` positions ahead of what was really issued.
    """

    path: Path
    chunk: int

    def read(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["reserved"])
        except FileNotFoundError:
            return 0

    def cover(self, ledger: Ledger, upto: int) -> None:
        """Make sure positions below `upto` are reserved (on disk first, then in `ledger`)."""
        if upto <= ledger.reserved:
            return
        reserved = upto + self.chunk
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"reserved": reserved}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        ledger.reserved = reserved


class Dispatcher:
    """Builds the task at each position; the ledger decides how many may go out."""

    def __init__(self, dataset: DatasetConfig, problems: list[Problem], key: str):
        self.dataset = dataset
        self.problems = problems
        self.key = key
        self._orders: dict[int, list[int]] = {}
        self.sampling = Sampling(
            temperature=dataset.temperature, top_p=dataset.top_p, max_tokens=dataset.max_tokens
        )
        self.max_payload: int | None = None
        self.too_large: dict[int, int] = {}
        """Rows whose scored group could exceed `max_payload` -> the bytes it could need."""

    def fit(self, max_payload: int) -> None:
        """Size every task against the bus's `max_payload` (the largest message the server
        takes): the configured groups must fit, rows whose prompt makes them too large are
        noted (`too_large`) and skipped when their turn comes."""
        from protocol.codec import encode
        from protocol.config import ConfigError

        d = self.dataset
        base = estimate_scored_bytes(d.group_size, d.max_tokens, 0, 0)
        if base > max_payload:
            raise ConfigError(
                f"learner.dataset.group_size × learner.dataset.max_tokens = {d.group_size} × "
                f"{d.max_tokens} makes scored groups of up to {base / 2**20:.1f} MiB, more than "
                f"the NATS server's max_payload of {max_payload / 2**20:.1f} MiB: raise the "
                "server's max_payload (the embedded server sizes it from the config; "
                "deploy/nats/nats.conf, Helm nats.config.merge.max_payload) or lower them"
            )
        self.max_payload, self.too_large = max_payload, {}
        shared = len(json.dumps([d.rewards, d.meta], default=str)) + 1024  # same in every task
        for row, problem in enumerate(self.problems):
            ids = len(problem.prompt_token_ids or ())
            # A bound without encoding (msgpack is no longer than JSON for these fields);
            # only a row near the limit is encoded to measure it.
            task_bytes = (
                len(problem.prompt.encode())
                + 4 * ids
                + shared
                + len(json.dumps(problem.reference, default=str))
            )
            if estimate_scored_bytes(d.group_size, d.max_tokens, task_bytes, ids) <= max_payload:
                continue
            task_bytes = len(encode(self._task(problem, task_id(self.key, 0), 0)))
            needed = estimate_scored_bytes(d.group_size, d.max_tokens, task_bytes, ids)
            if needed > max_payload:
                self.too_large[row] = needed
        if len(self.too_large) == len(self.problems):
            raise ConfigError(
                f"learner.dataset.path: no row's scored group fits the NATS server's "
                f"max_payload of {max_payload / 2**20:.1f} MiB (prompts too long for "
                f"group_size × max_tokens = {d.group_size} × {d.max_tokens})"
            )

    def row(self, position: int) -> int:
        """Dataset row of `position`."""
        epoch, offset = divmod(position, len(self.problems))
        order = self._orders.get(epoch)
        if order is None:  # keep two passes: admissions straddle a pass boundary
            order = permutation(self.dataset.seed, epoch, len(self.problems))
            self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) == 1}
            self._orders[epoch] = order
        return order[offset]

    def task(self, position: int, version: int) -> Task:
        return self._task(self.problems[self.row(position)], task_id(self.key, position), version)

    def _task(self, problem: Problem, tid: str, version: int) -> Task:
        ids = problem.prompt_token_ids
        return Task(
            task_id=tid,
            prompt_id=problem.prompt_id,
            prompt=problem.prompt,
            prompt_token_ids=None if ids is None else np.asarray(ids, dtype=np.int32),
            reference=problem.reference,
            rewards=dict(problem.rewards or self.dataset.rewards),
            group_size=self.dataset.group_size,
            sampling=self.sampling,
            issued_version=version,
            meta=dict(self.dataset.meta if problem.meta is None else problem.meta),
            policy=self.key,  # sampled with this learner's weights, never another's
        )

    def position(self, tid: str) -> int | None:
        return task_position(self.key, tid)

    def mismatch(self, task: Task, position: int) -> str | None:
        """How `task` differs from the task issued at `position` (None when it does not)."""
        problem = self.problems[self.row(position)]
        expected = {
            "prompt_id": problem.prompt_id,
            "prompt": problem.prompt,
            "group_size": self.dataset.group_size,
            "sampling": self.sampling,
        }
        for name, value in expected.items():
            if getattr(task, name) != value:
                return f"its task's {name} is not the one issued as {task.task_id}"
        ids = problem.prompt_token_ids
        if ids is not None and (
            task.prompt_token_ids is None or task.prompt_token_ids.tolist() != ids
        ):
            return f"its task's prompt_token_ids are not the ones issued as {task.task_id}"
        return None


@dataclass
class Issued:
    """What one `top_up` did."""

    published: int = 0
    too_large: list[str] = field(default_factory=list)
    """Task ids skipped because their group could not fit the bus (issued and dropped)."""


async def top_up(
    bus,
    dispatcher: Dispatcher,
    ledger: Ledger,
    limit: int,
    version: int,
    reservation: Reservation | None = None,
) -> Issued:
    """Publish tasks until `limit` groups are in flight.

    Each position is reserved first (`reservation`; without one, in memory only). A task
    whose group could exceed the bus's `max_payload` is not published: its position is
    issued and dropped at once, and its id returned in `too_large` for the count.
    """
    from nats.errors import MaxPayloadError

    from protocol.codec import encode
    from protocol.names import TASKS

    issued = Issued()
    while ledger.room(limit) > 0:
        position = ledger.issued
        if reservation is not None:
            reservation.cover(ledger, position + 1)
        else:
            ledger.reserved = max(ledger.reserved, position + 1)
        task = dispatcher.task(position, version)
        needed = dispatcher.too_large.get(dispatcher.row(position))
        if needed is None:
            try:
                await bus.publish(TASKS, task)
            except MaxPayloadError:  # the task itself, larger than `fit` estimated
                needed = len(encode(task))
        if needed is not None:
            ledger.lose(ledger.issue())
            issued.too_large.append(task.task_id)
            log.warning(
                "task skipped: its group cannot fit the bus",
                task_id=task.task_id,
                prompt_id=task.prompt_id,
                needs_bytes=needed,
                max_payload=dispatcher.max_payload,
            )
            continue
        ledger.issue()  # only once the server has it: a failed publish is retried by position
        issued.published += 1
    return issued
