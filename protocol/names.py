"""Every subject, stream, consumer and bucket name aha uses.

Nothing outside `protocol/` spells one of these strings: call sites import the constants
(or the `Stage` records) from here, so a rename is one edit and a grep finds every user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUBJECT_PREFIX = "aha"

# Work-queue stages: each message sits in its stream until the next stage acks it.
SUBJECT_TASKS = "aha.tasks"
SUBJECT_ROLLOUTS = "aha.rollouts"
SUBJECT_SCORED = "aha.scored"

STREAM_TASKS = "AHA_TASKS"
STREAM_ROLLOUTS = "AHA_ROLLOUTS"
STREAM_SCORED = "AHA_SCORED"

# One durable pull consumer per stage, shared by every replica of the consuming process.
CONSUMER_TASKS = "actors"
CONSUMER_ROLLOUTS = "rewarders"
CONSUMER_SCORED = "learner"

# Dead letters: `aha.dead.<stage>` in a limits stream an operator reads and purges.
SUBJECT_DEAD_PREFIX = "aha.dead"
SUBJECT_DEAD_ALL = "aha.dead.>"
STREAM_DEAD = "AHA_DEAD"

# Weights: the manifest in a KV bucket, the shards in an object store.
KV_POLICY = "aha-policy"
KEY_LATEST = "latest"
OBJECT_STORE_WEIGHTS = "aha-weights"

# Replies (publish acks, fetched messages, object-store chunks) go to the connection's
# inbox subjects. A connection as NATS user U uses `_INBOX_U.<id>`, so that the deployments
# can let each user subscribe to its own replies only (`_INBOX_U.>`): with the shared
# `_INBOX.>`, any user could read the tasks and weights another one fetched.
INBOX_PREFIX = "_INBOX"
"""NATS's default inbox prefix: connections without a user name (the embedded server)."""


def inbox_prefix(user: str | None) -> str:
    """The inbox prefix of a connection as NATS `user` (`_INBOX_<user>`)."""
    if user is None:
        return INBOX_PREFIX
    if not re.fullmatch(r"[\w.-]+", user, re.ASCII):
        raise ValueError(
            f"bus.user {user!r} cannot name its reply subjects ({INBOX_PREFIX}_<user>):"
            " use letters, digits, '.', '-' and '_'"
        )
    return f"{INBOX_PREFIX}_{user}"


# Headers aha sets on dead letters (Nats-Msg-Id is NATS's own deduplication header).
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_STAGE = "Aha-Stage"
HEADER_ERROR = "Aha-Error"
HEADER_SUBJECT = "Aha-Subject"
HEADER_STREAM_SEQ = "Aha-Stream-Seq"
HEADER_DELIVERIES = "Aha-Deliveries"


@dataclass(frozen=True)
class Stage:
    """One hop of the loop: the stream its messages sit in and the consumer that drains it."""

    name: str
    subject: str
    stream: str
    durable: str
    message: str
    """Name of the `protocol.messages` class this stage carries."""

    @property
    def dead_subject(self) -> str:
        return f"{SUBJECT_DEAD_PREFIX}.{self.name}"

    @property
    def max_deliveries_advisory(self) -> str:
        # Published by the server when a message reaches the consumer's max_deliver.
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.durable}"


TASKS = Stage("tasks", SUBJECT_TASKS, STREAM_TASKS, CONSUMER_TASKS, "Task")
ROLLOUTS = Stage("rollouts", SUBJECT_ROLLOUTS, STREAM_ROLLOUTS, CONSUMER_ROLLOUTS, "Rollout")
SCORED = Stage("scored", SUBJECT_SCORED, STREAM_SCORED, CONSUMER_SCORED, "ScoredRollout")

STAGES: dict[str, Stage] = {s.name: s for s in (TASKS, ROLLOUTS, SCORED)}
"""The three work-queue stages, in loop order."""

DEAD = "dead"
"""Key of the dead-letter stream in queue-depth reports."""
