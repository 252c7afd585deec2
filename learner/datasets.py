"""The prompt rows the dispatcher issues: JSONL, Parquet and Arrow files alike, several files
mixed by weight, per-row reward settings, over-long prompts left out and counted.

JSONL is read strictly here (`protocol.config.read_jsonl`: a bad line is named by file and
line); Parquet and Arrow through Hugging Face `datasets` (imported only for them; the
`datasets` extra). A row may carry its own `rewards` (name -> weight) and `meta` objects: its
task gets them instead of its source's or the dataset's.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Gauge

from learner.config import DatasetConfig
from protocol.config import ConfigError, read_jsonl

log = structlog.get_logger("learner.datasets")

PROMPTS_TOO_LONG = Gauge(
    "aha_learner_prompts_too_long", "Dataset rows left out: prompt over max_prompt_length"
)

TABLES = (".parquet", ".arrow")
"""Suffixes read with `datasets` (and folders written by its `save_to_disk`)."""


@dataclass(frozen=True)
class Row:
    """One problem as read: its text, reference and (where set) its own reward settings."""

    prompt_id: str
    text: str
    reference: Any
    rewards: dict[str, float] | None = None
    """The task's rewards; None: the dataset's."""
    meta: dict[str, Any] | None = None
    """The task's meta; None: the dataset's."""


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) per row of a JSONL, Parquet or Arrow file: `file:line` or `file#row`."""
    path = Path(path)
    if path.is_dir() or path.suffix in TABLES:
        for i, row in enumerate(_table(path)):
            yield f"{path}#{i}", row
    else:
        for number, row in read_jsonl(path):
            yield f"{path}:{number}", row


def _table(path: Path):
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            f"reading Parquet/Arrow needs `pip install 'aha[datasets]'` ({path})"
        ) from e
    if not path.exists():
        raise ConfigError(f"cannot read: no such file or folder ({path})")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path), keep_in_memory=True)
        elif path.suffix == ".parquet":
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        else:
            table = datasets.Dataset.from_file(str(path), in_memory=True)
    except Exception as e:  # whatever pyarrow or datasets raise on a file that is not theirs
        raise ConfigError(f"not a readable dataset: {type(e).__name__}: {e} ({path})") from e
    if not isinstance(table, datasets.Dataset):
        raise ConfigError(f"a dataset with splits {list(table)}: name one split's folder ({path})")
    return table


def source_rows(
    path: str | Path,
    prompt_field: str,
    answer_field: str,
    *,
    rewards: dict[str, float] | None = None,
    meta: dict[str, Any] | None = None,
    prefix: str = "",
) -> list[Row]:
    """Every row of one file; `ConfigError` naming the file and row of the first bad one."""
    rows = []
    for i, (where, record) in enumerate(read_records(path)):
        try:
            json.dumps(record, allow_nan=False)  # no NaN, no bytes: what travels in a task
            text, reference = str(record[prompt_field]), record[answer_field]
            own_rewards = _rewards(record.get("rewards"))
            own_meta = record.get("meta")
            if own_meta is not None and not isinstance(own_meta, dict):
                raise ValueError('"meta" must be an object')
            if own_meta is not None:
                own_meta = {k: v for k, v in own_meta.items() if v is not None}
        except KeyError as e:
            raise ConfigError(f"no field {e.args[0]!r} ({where})") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{' '.join(str(e).split())} ({where})") from None
        rows.append(Row(f"{prefix}{i}", text, reference, own_rewards or rewards, own_meta or meta))
    if not rows:
        raise ConfigError(f"no rows ({path})")
    return rows


def _rewards(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, dict):  # a Parquet struct has every row's keys: None where unset
        value = {k: w for k, w in value.items() if w is not None}
    if (
        not isinstance(value, dict)
        or not value
        or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
            for w in value.values()
        )
    ):
        raise ValueError('"rewards" must be an object of name -> finite weight')
    return {str(k): float(w) for k, w in value.items()}


def shares(size: int, weights: Sequence[float]) -> list[int]:
    """`size` split in proportion to `weights`, in whole rows that add up to `size`: each gets
    the floor of its quota, and the rows left go to the largest remainders (the first on a tie).
    E.g. 10 rows at weights 2:1 -> quotas 6.67, 3.33 -> 6, 3, and the last row to the first."""
    total = sum(weights)
    quotas = [size * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda k: (counts[k] - quotas[k], k))
    for k in by_remainder[: size - sum(counts)]:
        counts[k] += 1
    return counts


def draw(rows: list[Row], count: int, seed: str) -> list[Row]:
    """`count` of `rows`: each row once per seeded shuffle, shuffles repeated as needed."""
    out: list[Row] = []
    cycle = 0
    while len(out) < count:
        order = list(range(len(rows)))
        random.Random(f"{seed}:{cycle}").shuffle(order)
        out += [rows[i] for i in order[: count - len(out)]]
        cycle += 1
    return out


def load_rows(dataset: DatasetConfig) -> list[Row]:
    """The rows of one pass over the data: `path` alone, or mixed with `sources` by weight."""
    first = source_rows(
        dataset.path,
        dataset.prompt_field,
        dataset.answer_field,
        prefix="0:" * bool(dataset.sources),
    )
    if not dataset.sources:
        return first
    parts, weights = [first], [dataset.weight]
    for k, source in enumerate(dataset.sources, 1):
        parts.append(
            source_rows(
                source.path,
                source.prompt_field or dataset.prompt_field,
                source.answer_field or dataset.answer_field,
                rewards=source.rewards,
                meta=source.meta,
                prefix=f"{k}:",
            )
        )
        weights.append(source.weight)
    size = dataset.mix_size or sum(len(p) for p in parts)
    counts = shares(size, weights)
    log.info("dataset mixture", rows=[len(p) for p in parts], drawn=counts)
    return [
        row
        for k, (part, count) in enumerate(zip(parts, counts, strict=True))
        for row in draw(part, count, f"aha-mix:{dataset.seed}:{k}")
    ]


def keep_short(problems: list, limit: int | None) -> list:
    """The problems whose prompt is at most `limit` long (tokens where tokenized, else
    characters); the others are counted (gauge, log line), not issued. `ConfigError` when none
    is left."""
    if limit is None:
        return problems

    def length(p) -> int:
        return len(p.prompt_token_ids) if p.prompt_token_ids is not None else len(p.prompt)

    kept = [p for p in problems if length(p) <= limit]
    dropped = len(problems) - len(kept)
    PROMPTS_TOO_LONG.set(dropped)
    if dropped:
        longest = max(length(p) for p in problems)
        log.warning(
            "prompts over max_prompt_length left out",
            dropped=dropped,
            of=len(problems),
            max_prompt_length=limit,
            longest=longest,
        )
    if not kept:
        raise ConfigError(f"learner.dataset.max_prompt_length: every prompt is longer than {limit}")
    return kept
