"""The learner's experiment tracking: its step and eval records to the `protocol.tracking`
backends (TensorBoard, Weights & Biases), and the trained groups' first completions as a
samples table. Rank 0 only; nothing happens unless `[learner.tracking]` names a backend.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

from learner.config import LearnerConfig
from protocol.tracking import Tracker

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
