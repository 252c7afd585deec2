"""`aha score IN.jsonl -o OUT.jsonl`: grade any model's outputs offline with aha's rewards.

Each input line is `{"completion": str, "reference": str | object, "rewards": {name: weight}}`
(other fields are kept, and an optional `"meta"` object is the task's meta, e.g.
`{"language": "zh", "answer_tag": true}`). Each output line is the input plus `"reward"`
(float, or null when a verifier could not decide), `"components"`, `"error"` (null or the
reason) and `"note"` (null or why a component is 0 by a rule, e.g. an answer that stalled its
verifier), in input order.

Every input line and the output path are checked before scoring starts; the first bad one
stops the command with one line naming it. Output lines are written and flushed as they are
scored, in input order, so a run that is killed leaves a prefix of its output: `--resume`
keeps those lines (each checked against its input line; a half-written last line is dropped)
and scores only the rest. Without `--resume` an existing output is refused, never overwritten.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, read_jsonl
from protocol.messages import Score, Task
from rewarder.pool import Job, VerifierPool
from rewarder.rewards import REWARDS, check_rewards, load_plugins
from rewarder.sandbox import SandboxConfig

SCORE_FIELDS = ("reward", "components", "error", "note")
"""What `aha score` adds to each input line."""


class InputError(ConfigError):
    """An input line or output path that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Summary:
    lines: int
    scored: int
    errors: int
    timeouts: int
    mean_reward: float | None
    kept: int = 0
    """Lines of an interrupted run that `--resume` kept rather than scored again."""


def needs_reference(reward: str) -> bool:
    """Whether a reward compares with the reference: its `reference` parameter has no default."""
    reference = inspect.signature(REWARDS[reward]).parameters["reference"]
    return reference.default is inspect.Parameter.empty


def read_jobs(path: Path) -> tuple[list[dict[str, Any]], list[Job]]:
    """The input rows and their jobs; raises `InputError` on the first bad line."""
    rows, jobs = [], []
    for number, row in read_jsonl(path):
        try:
            if not isinstance(row.get("completion"), str):
                raise ValueError('"completion" must be a string')
            rewards = row.get("rewards")
            if not isinstance(rewards, dict) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                for w in rewards.values()
            ):
                raise ValueError('"rewards" must be an object of name -> finite weight')
            check_rewards(rewards)
            compared = [name for name in rewards if needs_reference(name)]
            if compared and row.get("reference") is None:
                raise ValueError(f'no "reference" for {", ".join(compared)} to compare with')
            meta = row.get("meta")
            task = None
            if meta is not None:
                task = Task(
                    task_id=f"offline-{number}",
                    prompt_id=str(number),
                    prompt="",
                    reference=None,
                    rewards=rewards,
                    group_size=1,
                    issued_version=0,
                    meta=meta,
                )
        except ValueError as e:  # pydantic's ValidationError included
            raise InputError(f"{' '.join(str(e).split())} ({path}:{number})") from e
        rows.append(row)
        jobs.append(Job(row["completion"], row.get("reference"), rewards, task))
    return rows, jobs


def check_output(path: Path, resume: bool) -> None:
    """Raise `InputError` unless `path` can take the output (before any scoring)."""
    folder = path.parent
    if path.is_dir():
        raise InputError(f"the output is a directory ({path})")
    if not folder.is_dir():
        raise InputError(f"no such directory for the output ({folder})")
    if not resume and path.exists() and path.stat().st_size > 0:
        raise InputError(
            f"the output exists; --resume continues it, or remove it to score again ({path})"
        )


def read_done(path: Path, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The output lines an interrupted run wrote for `rows`, and the byte length they take
    (a half-written last line after them is to be dropped). Raises `InputError` when the
    output is not a prefix of this input's output."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    done = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            out = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise InputError(f"not a line aha score wrote ({path}:{number})") from e
        if number > len(rows):
            raise InputError(f"more lines than the input has ({path}:{number})")
        row = rows[number - 1]
        kept = {k: v for k, v in row.items() if k not in SCORE_FIELDS}
        if (
            not isinstance(out, dict)
            or "reward" not in out
            or any(out.get(k) != v for k, v in kept.items())
        ):
            raise InputError(f"not the output of input line {number} ({path}:{number})")
        done.append(out)
    return done, end


class InOrder:
    """Writes each score as its output line, in input order however the scores finish, and
    flushes each line: a killed run keeps every line written so far."""

    def __init__(self, f, rows: list[dict[str, Any]], start: int):
        self.f, self.rows, self.next = f, rows, start
        self.ready: dict[int, Score] = {}
        self.notes: dict[int, str | None] = {}
        self.rewards: list[float] = []

    def add(self, n: int, score: Score, note: str | None = None) -> None:
        self.ready[n] = score
        self.notes[n] = note
        while self.next in self.ready:
            score, note = self.ready.pop(self.next), self.notes.pop(self.next)
            out = {
                **self.rows[self.next],
                "reward": score.reward,
                "components": score.components,
                "error": score.error,
                "note": note,
            }
            self.f.write(json.dumps(out, ensure_ascii=False, allow_nan=False) + "\n")
            self.f.flush()
            if score.reward is not None:
                self.rewards.append(score.reward)
            self.next += 1


def score_file(
    in_path: Path,
    out_path: Path,
    workers: int = 2,
    timeout_s: float = 30.0,
    progress: bool | None = None,
    resume: bool = False,
    sandbox: SandboxConfig | None = None,
    plugins: Sequence[str] = (),
) -> Summary:
    """Score every line of `in_path` into `out_path` (with `resume`, only those an earlier run
    did not write); a progress bar when `progress` (default: stderr is a terminal). `plugins`
    (`module:function`) are rewards the lines may name besides the built-in ones."""
    check_output(out_path, resume)
    try:
        load_plugins(list(plugins))
    except ValueError as e:
        raise InputError(f"rewarder.plugins: {e}") from e
    rows, jobs = read_jobs(in_path)
    done, end = read_done(out_path, rows) if resume else ([], 0)
    try:
        f = open(out_path, "a" if resume else "w", encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write the output: {e.strerror or e} ({out_path})") from e
    with f:
        f.truncate(end)  # a half-written last line is scored again
        writer = InOrder(f, rows, start=len(done))
        remaining = jobs[len(done) :]

        def on_score(i: int, score: Score) -> None:
            writer.add(len(done) + i, score, pool.notes.get(i))

        show = sys.stderr.isatty() if progress is None else progress
        limits = sandbox or SandboxConfig()
        pool = VerifierPool(workers, timeout_s, sandbox=limits, plugins=plugins)
        with pool:
            if show and remaining:
                from rich.progress import Progress

                with Progress(transient=False) as bar:
                    task = bar.add_task(f"scoring {in_path.name}", total=len(remaining))

                    def advance(i: int, score: Score) -> None:
                        on_score(i, score)
                        bar.advance(task)

                    pool.map(remaining, on_score=advance)
            else:
                pool.map(remaining, on_score=on_score)
            stats = pool.stats
    rewards = [o["reward"] for o in done if o["reward"] is not None] + writer.rewards
    return Summary(
        lines=len(rows),
        scored=len(rewards),
        errors=len(rows) - len(rewards),
        timeouts=stats.timeouts,
        mean_reward=sum(rewards) / len(rewards) if rewards else None,
        kept=len(done),
    )


def main(args) -> int:
    """The `aha score` command: `[rewarder]` settings from `--config`, the flags and `--set`."""
    from protocol.config import config_from_args
    from rewarder.config import RewarderConfig

    flags = {"workers": args.workers, "timeout_s": args.timeout}
    config = config_from_args(RewarderConfig, args, "rewarder", flags)
    summary = score_file(
        Path(args.input),
        Path(args.output),
        config.workers,
        config.timeout_s,
        resume=args.resume,
        sandbox=config.sandbox,
        plugins=config.plugins,
    )
    mean = "-" if summary.mean_reward is None else f"{summary.mean_reward:.4f}"
    kept = f", {summary.kept} kept from the interrupted run" if summary.kept else ""
    print(
        f"scored {summary.scored}/{summary.lines} completions, mean reward {mean}, "
        f"{summary.errors} without reward ({summary.timeouts} timeouts){kept} -> {args.output}",
        file=sys.stderr,
    )
    return 0
