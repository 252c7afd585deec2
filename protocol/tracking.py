"""Experiment tracking: a process's metrics to TensorBoard and Weights & Biases.

Besides the Prometheus gauges (and the learner's `metrics.jsonl`), a `Tracker` writes each
`every_n_steps`-th record's numbers as TensorBoard scalars (event files under
`dir/tensorboard`, an actor's under `dir/tensorboard/<actor id>`) and as a W&B run (under
`dir/wandb`; `offline` by default, so it works with no network and `wandb sync` uploads it
later), and on request a table of sample completions (a W&B table, TensorBoard text). The
libraries are imported only when a backend is configured (the `tracking` extra). The learner's
hooks are `learner.tracking`; the actor's, `actors.service`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from protocol.config import CONFIG


class TrackingConfig(BaseModel):
    """Experiment tracking, besides Prometheus (and the learner's `metrics_file`): the
    `[learner.tracking]` and `[actor.tracking]` sections."""

    model_config = CONFIG

    backends: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Where to write: TensorBoard event files, a Weights & Biases run; none by default."""
    dir: str | None = None
    """Folder for `tensorboard/` and `wandb/`; None: next to `metrics_file` (the run folder
    under `aha up`), else `./tracking`."""
    project: str = "aha"
    """W&B project."""
    run_name: str | None = None
    """W&B run name; None: W&B picks one (an actor: its actor id)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes the run to `dir/wandb` with no network (`wandb sync` uploads it);
    `online` streams it (needs `WANDB_API_KEY`)."""
    every_n_steps: int = Field(1, ge=1)
    """Log the metrics of every this many steps (an actor: rollouts)."""
    samples_every_n_steps: int = Field(10, ge=0)
    """Log a table of sample completions every this many steps; 0 never."""
    samples_per_step: int = Field(4, ge=1)
    """Rows of that table: the first completion of each of this many trained groups."""


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

    def __init__(
        self,
        config: TrackingConfig,
        root: Path,
        run_config: dict | None = None,
        name: str | None = None,
    ):
        """Open the backends under `root`; a `name` (an actor's id) gets its own TensorBoard
        folder (`tensorboard/<name>`, a run of its own in TensorBoard) and W&B run name."""
        self.config = config
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in config.backends:
            from torch.utils.tensorboard import SummaryWriter

            folder = root / "tensorboard" / name if name else root / "tensorboard"
            self.tensorboard = SummaryWriter(log_dir=str(folder))
        if "wandb" in config.backends:
            import wandb

            root.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=config.project,
                name=config.run_name or name,
                dir=str(root),
                mode=config.wandb_mode,
                config=run_config,
                reinit="finish_previous",
            )

    def log_step(self, record: dict[str, Any], every: bool = True) -> None:
        """One step record's numbers (every `every_n_steps`-th step; any step if not `every`)."""
        step = record["step"]
        if every and step % self.config.every_n_steps:
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
