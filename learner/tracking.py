"""Experiment tracking: the learner's step and eval metrics to TensorBoard and Weights & Biases.

Besides the Prometheus gauges and `metrics.jsonl` (`learner.metrics`), rank 0 writes every
`every_n_steps`-th step's numbers as TensorBoard scalars (event files under `dir/tensorboard`)
and as a W&B run (under `dir/wandb`; `offline` by default, so it works with no network and
`wandb sync` uploads it later), and every `samples_every_n_steps`-th step a table of sample
completions (a W&B table, TensorBoard text). The libraries are imported only when a backend
is configured (the `tracking` extra).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from learner.config import LearnerConfig, TrackingConfig

SAMPLE_COLUMNS = ("step", "task_id", "prompt", "completion", "reward")
"""The columns of the sample-completions table."""

SKIPPED = frozenset({"event", "step", "time", "version"})
"""Record keys that are not metrics (the step is the x axis)."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by metric name: top-level numbers as they are, per-reward means as
    `reward/<name>` (and `reward_std/<name>`); lists, text and None left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIPPED:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            if key in ("rewards", "rewards_std") and isinstance(value, dict):
                prefix = "reward" if key == "rewards" else "reward_std"
                out.update({f"{prefix}/{name}": v for name, v in value.items() if _number(v)})
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """The configured backends, open for one learner run."""

    def __init__(self, config: TrackingConfig, root: Path, run_config: dict | None = None):
        self.config = config
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in config.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(root / "tensorboard"))
        if "wandb" in config.backends:
            import wandb

            root.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=config.project,
                name=config.run_name,
                dir=str(root),
                mode=config.wandb_mode,
                config=run_config,
                reinit="finish_previous",
            )

    def log_step(self, record: dict[str, Any]) -> None:
        """One step record's numbers (every `every_n_steps`-th step)."""
        step = record["step"]
        if step % self.config.every_n_steps:
            return
        values = scalars(record)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_eval(self, record: dict[str, Any]) -> None:
        """An eval line (`learner.evaluation`) as `eval/<bench>/<metric>` at its training step
        (`pass_at_k`, `cons_at_k`: one scalar per k). W&B's steps only grow and the line comes
        after later steps, so there it is logged at the run's current step with `eval/step`."""
        step, prefix = record["step"], f"eval/{record['bench']}/"
        values = {}
        for key, value in record.items():
            if isinstance(value, dict):
                values.update({f"{prefix}{key}/{k}": v for k, v in value.items() if _number(v)})
            elif key not in SKIPPED and _number(value):
                values[prefix + key] = float(value)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({**values, "eval/step": step})

    def log_samples(self, step: int, rows: Iterable[tuple[str, str, str, float | None]]) -> None:
        """Sample completions, `(task_id, prompt, completion, reward)`, as a table (every
        `samples_every_n_steps`-th step; at most `samples_per_step` rows)."""
        if not self.config.samples_every_n_steps or step % self.config.samples_every_n_steps:
            return
        table = [(step, *row) for row in rows][: self.config.samples_per_step]
        if not table:
            return
        if self.tensorboard is not None:
            lines = [" | ".join(SAMPLE_COLUMNS), " | ".join("---" for _ in SAMPLE_COLUMNS)]
            lines += [" | ".join(_cell(v) for v in row) for row in table]
            self.tensorboard.add_text("samples", "\n".join(lines), global_step=step)
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            data = [list(row) for row in table]
            self.wandb.log(
                {"samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=data)}, step=step
            )

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _cell(value: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


ACTIVE: Tracker | None = None
"""The learner process's tracker (rank 0), once `start` ran; `learner.metrics` logs to it."""


def start(config: LearnerConfig) -> Tracker | None:
    """Open the backends of `config.tracking` for this process (none configured: nothing
    happens); closed at exit, so an interrupted run's files are complete too."""
    global ACTIVE
    stop()  # a second run in one process (tests) starts afresh
    tracking = config.tracking
    if not tracking.backends:
        return None
    if tracking.dir is not None:
        root = Path(tracking.dir)
    elif config.metrics_file is not None:
        root = Path(config.metrics_file).parent
    else:
        root = Path("tracking")
    ACTIVE = Tracker(tracking, root, config.model_dump(mode="json", exclude={"bus"}))
    atexit.register(stop)
    return ACTIVE


def stop() -> None:
    global ACTIVE
    if ACTIVE is not None:
        ACTIVE.close()
        ACTIVE = None
    SEEN.clear()


SEEN: dict[str, tuple[str, str, float | None]] = {}
"""Task id -> (prompt, first completion, its reward) of the groups received and not yet in a
step record, kept only while a tracker logs samples (what the table is drawn from)."""


def remember(scored: Any) -> None:
    """Keep a received `ScoredRollout`'s prompt and first completion for the samples table."""
    if ACTIVE is None or not ACTIVE.config.samples_every_n_steps:
        return
    rollout = scored.rollout
    reward = scored.scores[0].reward if scored.scores else None
    SEEN[rollout.task.task_id] = (rollout.task.prompt, rollout.samples[0].text, reward)


def log_step(record: dict[str, Any]) -> None:
    """A step record to the active tracker (if any): its numbers, and on a samples step the
    table of the trained groups' first completions."""
    if ACTIVE is None:
        return
    ACTIVE.log_step(record)
    rows = [(t, *SEEN[t]) for t in record.get("task_ids", []) if t in SEEN]
    ACTIVE.log_samples(record["step"], rows)
    for task_id in (*record.get("task_ids", []), *record.get("task_ids_dropped", [])):
        SEEN.pop(task_id, None)


def log_eval(record: dict[str, Any]) -> None:
    """An eval line to the active tracker (if any)."""
    if ACTIVE is not None:
        ACTIVE.log_eval(record)
