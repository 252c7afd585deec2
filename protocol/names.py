"""Every subject, stream, consumer and bucket name aha uses.

Nothing outside `protocol/` spells one of these strings: call sites import the constants
(or the `Stage` records) from here, so a rename is one edit and a grep finds every user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

SUBJECT_PREFIX = "aha"

# Work-queue stages: each message sits in its stream until the next stage acks it.
SUBJECT_TASKS = "aha.tasks"
SUBJECT_ROLLOUTS = "aha.rollouts"
SUBJECT_SCORED = "aha.scored"
"""Prefix of the scored subjects: a job's groups go to `aha.scored.<job>` (`scored_subject`)."""
SUBJECT_SCORED_ALL = "aha.scored.>"
"""What the scored stream holds: every job's groups."""

STREAM_TASKS = "AHA_TASKS"
STREAM_ROLLOUTS = "AHA_ROLLOUTS"
STREAM_SCORED = "AHA_SCORED"

# One durable pull consumer per stage, shared by every replica of the consuming process.
CONSUMER_TASKS = "actors"
CONSUMER_ROLLOUTS = "rewarders"
CONSUMER_SCORED = "learner"

# Jobs: the learner's training and any number of generation jobs (eval, rejection sampling,
# teacher traces) share the tasks and rollouts stages; each job's scored groups reach its own
# subject and durable consumer, so one job never sees (or acks) another's.
JOB_TRAIN = "train"
"""The learner's job: its durable consumer `learner` reads `aha.scored.train`."""
JOB_CONSUMER_PREFIX = "job-"
"""A generation job's durable consumer on the scored stream is `job-<job>`."""
_JOB_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


def check_job(job: str) -> str:
    """`job` if it can be one subject token and a consumer name (letters, digits, `-`, `_`;
    no `.`, `*`, `>` or whitespace that would reach another subject), else ValueError."""
    if not isinstance(job, str) or not _JOB_NAME.fullmatch(job):
        raise ValueError(
            f"job name {job!r}: use 1 to 64 letters, digits, '-' and '_' (it becomes a subject"
            " token and a consumer name)"
        )
    return job


def scored_subject(job: str) -> str:
    """The subject a job's scored groups are published to."""
    return f"{SUBJECT_SCORED}.{check_job(job)}"


def job_consumer(job: str) -> str:
    """The durable consumer a generation job reads its scored groups with."""
    if check_job(job) == JOB_TRAIN:
        return CONSUMER_SCORED
    return f"{JOB_CONSUMER_PREFIX}{job}"


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
    stream_subject: str = ""
    """The subjects its stream holds (default: `subject`); `subject` is then the one its
    consumer `durable` filters on and a publish without a job goes to."""

    @property
    def stream_subjects(self) -> str:
        return self.stream_subject or self.subject

    @property
    def dead_subject(self) -> str:
        return f"{SUBJECT_DEAD_PREFIX}.{self.name}"

    @property
    def max_deliveries_advisory(self) -> str:
        # Published by the server when a message reaches the consumer's max_deliver.
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.durable}"


TASKS = Stage("tasks", SUBJECT_TASKS, STREAM_TASKS, CONSUMER_TASKS, "Task")
ROLLOUTS = Stage("rollouts", SUBJECT_ROLLOUTS, STREAM_ROLLOUTS, CONSUMER_ROLLOUTS, "Rollout")
SCORED = Stage(
    "scored",
    f"{SUBJECT_SCORED}.{JOB_TRAIN}",
    STREAM_SCORED,
    CONSUMER_SCORED,
    "ScoredRollout",
    SUBJECT_SCORED_ALL,
)
"""The learner's (training job's) view of the scored stage; `scored_stage(job)` another's."""

STAGES: dict[str, Stage] = {s.name: s for s in (TASKS, ROLLOUTS, SCORED)}
"""The three work-queue stages, in loop order."""


def scored_stage(job: str) -> Stage:
    """The scored stage as job `job` sees it: its subject and its durable consumer."""
    return replace(SCORED, subject=scored_subject(job), durable=job_consumer(job))


DEAD = "dead"
"""Key of the dead-letter stream in queue-depth reports."""
