"""`aha score IN.jsonl -o OUT.jsonl`: grade any model's outputs offline with aha's rewards.

Each input line is `{"completion": str, "reference": str | object, "rewards": {name: weight}}`
(other fields are kept, and an optional `"meta"` object is the task's meta, e.g.
`{"language": "zh", "answer_tag": true}`). Each output line is the input plus `"reward"`
(float, or null when a verifier could not decide), `"components"` and `"error"` (null or the
reason), in input order.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.messages import Task
from rewarder.pool import Job, VerifierPool
from rewarder.rewards import check_rewards


class InputError(ValueError):
    """A line of the input file that cannot be scored; the message names the line."""


@dataclass(frozen=True)
class Summary:
    lines: int
    scored: int
    errors: int
    timeouts: int
    mean_reward: float | None


def read_jobs(path: Path) -> tuple[list[dict[str, Any]], list[Job]]:
    """The input rows and their jobs; raises `InputError` on the first bad line."""
    rows, jobs = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                if not isinstance(row.get("completion"), str):
                    raise ValueError('"completion" must be a string')
                rewards = row.get("rewards")
                if not isinstance(rewards, dict) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool)
                    for w in rewards.values()
                ):
                    raise ValueError('"rewards" must be an object of name -> weight')
                check_rewards(rewards)
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
            except ValueError as e:  # json.JSONDecodeError and pydantic errors included
                raise InputError(f"{path}:{number}: {e}") from e
            rows.append(row)
            jobs.append(Job(row["completion"], row.get("reference"), rewards, task))
    return rows, jobs


def score_file(
    in_path: Path,
    out_path: Path,
    workers: int = 2,
    timeout_s: float = 30.0,
    progress: bool | None = None,
) -> Summary:
    """Score every line of `in_path` into `out_path`; a progress bar when `progress` (default:
    stderr is a terminal)."""
    rows, jobs = read_jobs(in_path)
    show = sys.stderr.isatty() if progress is None else progress
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        if show and jobs:
            from rich.progress import Progress

            with Progress(transient=False) as bar:
                task = bar.add_task(f"scoring {in_path.name}", total=len(jobs))
                scores = pool.map(jobs, on_score=lambda i, s: bar.advance(task))
        else:
            scores = pool.map(jobs)
        stats = pool.stats
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, score in zip(rows, scores):
            out = {
                **row,
                "reward": score.reward,
                "components": score.components,
                "error": score.error,
            }
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)  # never a half-written output
    rewards = [s.reward for s in scores if s.reward is not None]
    return Summary(
        lines=len(rows),
        scored=len(rewards),
        errors=len(rows) - len(rewards),
        timeouts=stats.timeouts,
        mean_reward=sum(rewards) / len(rewards) if rewards else None,
    )


def main(args) -> int:
    """The `aha score` command."""
    try:
        summary = score_file(Path(args.input), Path(args.output), args.workers, args.timeout)
    except InputError as e:
        print(f"aha score: {e}", file=sys.stderr)
        return 2
    mean = "-" if summary.mean_reward is None else f"{summary.mean_reward:.4f}"
    print(
        f"scored {summary.scored}/{summary.lines} completions, mean reward {mean}, "
        f"{summary.errors} without reward ({summary.timeouts} timeouts) -> {args.output}",
        file=sys.stderr,
    )
    return 0
