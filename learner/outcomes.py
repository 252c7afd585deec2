"""What becomes of the groups the learner issues and receives, written once.

`learner.step.judge` and `learner.loop` count them, `learner.metrics` logs and exports them
(`aha_learner_groups{outcome=...}`), the step and done lines carry them as `groups_<outcome>`,
`aha up` sums them up and the Grafana dashboard plots one series per outcome: each of those
iterates over `Outcome`, so a new outcome is counted, exported and plotted by adding it here.

Every task the learner issues ends in exactly one of the `ISSUED` outcomes, or is still in
flight:

    tasks_issued = Σ groups_<o> for o in ISSUED + groups_in_flight

`FOREIGN` and `DUPLICATES` count deliveries outside that sum: groups this run never issued,
and second deliveries of groups already consumed.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """One outcome; its value is the Prometheus label, `key` the name in the JSON lines."""

    TRAINED = "trained"
    """Trained on by a step."""
    DROPPED_STALE = "dropped_stale"
    """Sampled more than `max_staleness` versions before the learner's (DESIGN.md, "The
    off-policy bound")."""
    DROPPED_ZERO_VARIANCE = "dropped_zero_variance"
    """Every completion got the same reward: zero advantage (dropped with
    `drop_zero_variance`, DAPO's dynamic sampling)."""
    DROPPED_NO_REWARD = "dropped_no_reward"
    """No completion got a reward (every verifier failed): nothing to learn."""
    DROPPED_TOO_LARGE = "dropped_too_large"
    """Never published: its group could not fit the bus's `max_payload`."""
    DEAD = "dead"
    """Dead-lettered by an actor, a rewarder or this learner (refused, or to blame for a
    non-finite update): its place is freed."""
    FOREIGN = "foreign"
    """A scored group of a task this run never issued, dead-lettered."""
    DUPLICATES = "duplicates"
    """A delivery of a group already consumed by a checkpointed step: acked, not trained."""

    @property
    def key(self) -> str:
        """Its name in the step and done lines (`metrics.jsonl`, `aha up`'s summary)."""
        return f"groups_{self.value}"

    @property
    def label(self) -> str:
        """Its name for a person (the dashboard's legend)."""
        return self.value.replace("_", " ")


ISSUED = (
    Outcome.TRAINED,
    Outcome.DROPPED_STALE,
    Outcome.DROPPED_ZERO_VARIANCE,
    Outcome.DROPPED_NO_REWARD,
    Outcome.DROPPED_TOO_LARGE,
    Outcome.DEAD,
)
"""The outcomes that end an issued task; with the groups in flight they add up to
`tasks_issued`."""

IN_FLIGHT = "groups_in_flight"
"""Issued tasks whose scored group is not consumed yet (a level, not a running count); the
done line calls it `groups_in_flight_at_stop`."""
