"""The learner's numbers: Prometheus gauges and the JSON lines `aha up` reads.

Counts (`groups_<outcome>` of every `learner.outcomes.Outcome`, `tasks_issued`) are cumulative
over the whole run, restarts included (they live in the checkpoint), so they are gauges, not
counters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import Gauge, Histogram

from learner import tracking
from learner.outcomes import IN_FLIGHT, Outcome

_G = "aha_learner_"

LOSS = Gauge(f"{_G}loss", "GRPO loss of the last step")
KL = Gauge(f"{_G}kl", "Mean k3 KL to the reference per token, last step")
CLIP_FRACTION = Gauge(
    f"{_G}clip_fraction", "Share of tokens whose PPO ratio was clipped, last step"
)
RATIO = Gauge(f"{_G}ratio", "Mean PPO ratio π_θ/π_old per token, last step")
IS_WEIGHT = Gauge(f"{_G}is_weight", "Mean truncated importance weight min(π_old/μ, C), last step")
REWARD_MEAN = Gauge(
    f"{_G}reward_mean", "Mean reward of the step's fresh completions", ["component"]
)  # component="total" is the weighted sum
REWARD_STD = Gauge(f"{_G}reward_std", "Reward std of the step's fresh completions", ["component"])
ACCURACY = Gauge(f"{_G}accuracy", "Mean of the accuracy* reward components, last step")
RESPONSE_LENGTH = Gauge(f"{_G}response_length", "Mean completion length in tokens, last step")
STALENESS = Histogram(
    f"{_G}staleness", "v − b of each trained group", buckets=(0, 1, 2, 3, 4, 6, 8, 16)
)
GROUPS = Gauge(f"{_G}groups", "Scored groups consumed so far, by outcome", ["outcome"])
TASKS_ISSUED = Gauge(f"{_G}tasks_issued", "Tasks published so far")
STEPS_NONFINITE = Gauge(f"{_G}steps_nonfinite", "Updates skipped for a non-finite loss or gradient")
GROUPS_IN_FLIGHT = Gauge(f"{_G}{IN_FLIGHT}", "Tasks issued whose scored group has not arrived")
TOKENS_PER_S = Gauge(f"{_G}tokens_per_second", "Trained completion tokens per second of update")
STEP_SECONDS = Gauge(f"{_G}step_seconds", "Wall time of the last step, waiting included")
WAIT_SHARE = Gauge(f"{_G}wait_share", "Share of the last step's wall time spent waiting for data")
STEP = Gauge(f"{_G}step", "Optimizer steps taken")
VERSION = Gauge(f"{_G}policy_version", "Policy version being trained")
WEIGHT_PUBLISH_SECONDS = Gauge(
    f"{_G}weight_publish_seconds",
    "Last weight publish, step done to manifest visible: gather + cast + write + hash shards,"
    " HTTP offer (the object-store upload too when the weight server is off), manifest put",
)
WEIGHT_STORE_UPLOAD_SECONDS = Gauge(
    f"{_G}weight_store_upload_seconds",
    "Last object-store upload of a weight version (with the weight server on: in the"
    " background, after its manifest)",
)
WEIGHT_PUBLISH_BYTES = Gauge(
    f"{_G}weight_publish_bytes", "Bytes of the last published weight version"
)

STEP_KEYS = (
    "event",
    "step",
    "version",
    "reward",
    "accuracy",
    "response_length",
    "kl",
    "clip_fraction",
    "staleness_mean",
    "staleness_max",
    "policy_versions",
    *(o.key for o in Outcome),
    IN_FLIGHT,
    "tasks_issued",
    "tokens_per_s",
    "step_seconds",
    "wait_share",
    "time",
)
"""Keys every step line carries (`aha up` reads them); lines may have more."""


def export_gauges(record: dict[str, Any]) -> None:
    """Set every gauge from a step record (see `loop.step_record`)."""
    for gauge, key in (
        (LOSS, "loss"),
        (KL, "kl"),
        (CLIP_FRACTION, "clip_fraction"),
        (RATIO, "ratio"),
        (IS_WEIGHT, "is_weight"),
        (ACCURACY, "accuracy"),
        (RESPONSE_LENGTH, "response_length"),
        (TOKENS_PER_S, "tokens_per_s"),
        (STEP_SECONDS, "step_seconds"),
        (WAIT_SHARE, "wait_share"),
        (STEP, "step"),
        (VERSION, "version"),
        (TASKS_ISSUED, "tasks_issued"),
        (STEPS_NONFINITE, "steps_nonfinite"),
    ):
        if record.get(key) is not None:
            gauge.set(record[key])
    if record.get("reward") is not None:
        REWARD_MEAN.labels("total").set(record["reward"])
        REWARD_STD.labels("total").set(record["reward_std"])
    for name, mean in record.get("rewards", {}).items():
        REWARD_MEAN.labels(name).set(mean)
        REWARD_STD.labels(name).set(record["rewards_std"][name])
    for age in record.get("staleness", []):
        STALENESS.observe(age)
    for outcome in Outcome:
        GROUPS.labels(outcome.value).set(record[outcome.key])
    GROUPS_IN_FLIGHT.set(record[IN_FLIGHT])
    tracking.log_step(record)  # and to TensorBoard / W&B, where configured


def append_line(path: str | Path | None, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line (flushed at once: `aha up` tails the file)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
