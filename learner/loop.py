"""`aha learner`: issue tasks, collect scored groups, take GRPO steps, publish weights.

    dispatcher ──Task──▶ (actors, rewarders) ──ScoredRollout──▶ collect ──▶ train_step
        ▲   at most (max_staleness + 1) × batch in flight                       │
        └────────────── checkpoint, then ack ◀── publish weights every k steps ◀┘

Exactly once: a scored group is acknowledged only after a checkpoint that contains its
effect (trained, or counted as dropped) is saved; until then `in_progress` keeps it leased.
The checkpoint also holds the dispatcher's `Ledger`, so after a crash the groups held by
the dead process come back (redelivered) and are trained, and a group whose checkpoint was
saved but whose ack was lost is recognised as consumed and only acked.

Under `torchrun` rank 0 does all bus work and hands every other rank the same batch, checkpoint
and weight-gathering calls (`learner.ranks`).

Nothing on `aha.scored` is trusted (`admit`): a group under a task id this run never issued
(or whose task is not the one issued) is dead-lettered as foreign and counted; a group of an
issued task that cannot be trained on (`learner.step.refusal`) is dead-lettered and counts
as dead; an update whose loss or gradient is not finite applies nothing, its groups to blame
are dead-lettered, and `max_nonfinite_steps` of them in a row stop the learner (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from nats.errors import Error as NatsError

from learner import tracking
from learner.config import LearnerConfig
from learner.dispatcher import Dispatcher, Ledger, Reservation, load_problems, run_key, top_up
from learner.engine import PolicyEngine, load_checkpoint, setup_engine
from learner.evaluation import EvalJobs
from learner.metrics import (
    STEP_KEYS,
    WEIGHT_PUBLISH_BYTES,
    WEIGHT_PUBLISH_SECONDS,
    append_line,
    export_gauges,
)
from learner.outcomes import IN_FLIGHT, Outcome
from learner.ranks import collective, follow, stop_followers
from learner.step import (
    Group,
    batch_owners,
    build_batch,
    judge,
    refusal,
    sample_stats,
    shuffle_rewards,
    staleness_stats,
)
from learner.weights import (
    StoreUploads,
    prune_dirs,
    publish_weights,
    remove_stale_versions,
    remove_upload_leftovers,
    version_dir,
    weight_server,
)
from protocol.bus import Bus
from protocol.codec import DecodeError, decode_named, peek_task_id
from protocol.config import ConfigError
from protocol.messages import ScoredRollout
from protocol.names import SCORED, STAGES
from protocol.stage import Delivery, StageConsumer, mark_holding, stop_on_signals

log = structlog.get_logger("learner")

KEEP_CHECKPOINTS = 2
"""Checkpoint tags kept on disk (the newest is the one a restart loads)."""
LEASE_ERRORS = (NatsError, asyncio.TimeoutError)
"""What an ack or in_progress may raise when the server is away or the lease already gone."""
PUBLISH_RETRY_S = 30.0
"""A weight publish that keeps failing (server away) is retried with back-off up to this delay."""
HEARTBEAT_S = 60.0
"""While rank 0 waits for data, it wakes the other ranks this often (collectives time out)."""
FOREIGN = "foreign: "
"""Start of the reason of a dead letter for a scored group this run never issued."""
RESERVATION_FILE = "reserved.json"
"""In the checkpoint directory: how far task positions may have been published."""


# -- state that a checkpoint carries ------------------------------------------------------


@dataclass
class Progress:
    """Counts and position of the run; saved in every checkpoint."""

    step: int = 0
    version: int = 0
    """Policy version of the weights being trained (one per update)."""
    groups: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    """How many groups ended in each outcome (`learner.outcomes`)."""
    steps_nonfinite: int = 0
    """Updates skipped because their loss or gradient was not finite."""
    dead_seq: int = 0
    """Last dead-letter sequence looked at."""
    published_version: int = -1
    """Last policy version whose weights were published."""

    def counts(self) -> dict[str, int]:
        """`groups_<outcome>` of every outcome: the form the step and done lines carry."""
        return {o.key: self.groups[o] for o in Outcome}

    def state(self) -> dict[str, Any]:
        """The checkpoint's form: flat, the counts under their `groups_<outcome>` keys."""
        state = asdict(self)
        del state["groups"]
        return {**state, **self.counts()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """Read `state()` back; an outcome the checkpoint does not know yet counts 0."""
        state = dict(state)
        groups = {o: state.pop(o.key, 0) for o in Outcome}
        return cls(**state, groups=groups)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# -- fault injection (tests) --------------------------------------------------------------


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process at `name` on step `step` when `AHA_FAULT=name:step` (tests only)."""
    if os.environ.get("AHA_FAULT") == f"{name}:{step}":
        log.warning("fault injected: killing the learner", fault=name, step=step)
        os.kill(os.getpid(), signal.SIGKILL)


# -- leases on the scored groups held until the next checkpoint ----------------------------


@dataclass
class Leases:
    """Scored groups held by steps not yet checkpointed, kept leased with `in_progress`."""

    ack_wait_s: float
    held: dict[int, Delivery] = field(default_factory=dict)

    async def keep_alive(self) -> None:
        """Every third of the ack wait, tell the server we still work on every held group."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            for delivery in list(self.held.values()):
                try:
                    await delivery.in_progress()
                except LEASE_ERRORS as e:  # a lost lease only means a redelivery, deduplicated
                    log.warning("in_progress failed", error=repr(e))

    async def ack_all(self) -> None:
        """After a checkpoint: acknowledge (and forget) every held group."""
        held, self.held = self.held, {}
        for delivery in held.values():
            try:
                await delivery.ack_sync()
            except LEASE_ERRORS as e:  # it comes back and is recognised as a duplicate
                log.warning("ack failed", task_id=delivery.message.task_id, error=repr(e))

    async def release(self, positions: list[int]) -> None:
        """Hand groups back untrained (`nak`): another delivery comes at once."""
        for p in positions:
            delivery = self.held.pop(p, None)
            if delivery is not None:
                try:
                    await delivery.nak()
                except LEASE_ERRORS as e:  # it comes back after the ack wait instead
                    log.warning("nak failed", task_id=delivery.message.task_id, error=repr(e))


# -- the process ---------------------------------------------------------------------------


@dataclass
class Learner:
    """What the step functions share (plain data, no behaviour)."""

    config: LearnerConfig
    pe: PolicyEngine
    bus: Bus
    consumer: StageConsumer
    dispatcher: Dispatcher
    ledger: Ledger
    leases: Leases
    progress: Progress
    uncommitted: list[dict] = field(default_factory=list)
    """Step records of the steps trained since the last checkpoint."""
    last_step_end: float = field(default_factory=time.perf_counter)
    dead_checked_at: float = 0.0
    """When the dead-letter stream was last read (at most once a second)."""
    reservation: Reservation | None = None
    carried: list[tuple[Group, str]] = field(default_factory=list)
    """The held groups of an update that applied nothing, for the next attempt."""
    nonfinite_streak: int = 0
    """Updates in a row whose loss or gradient was not finite."""
    uploads: StoreUploads | None = None
    """The object-store copies of versions served over HTTP, uploaded in the background."""


class NonFiniteSteps(RuntimeError):
    """`max_nonfinite_steps` updates in a row had a non-finite loss or gradient."""


async def run(
    config: LearnerConfig, *, resume: bool = False, stop: asyncio.Event | None = None
) -> int:
    """Train until `max_steps` or SIGTERM/SIGINT; returns the exit status."""
    stop = stop_on_signals(stop)
    if resume and not has_checkpoint(config):
        raise ConfigError(f"--resume: no checkpoint in {config.checkpoint_dir}")
    problems = load_problems(config.dataset, load_tokenizer(config))
    pe = setup_engine(config)
    reservation = Reservation(
        Path(config.checkpoint_dir) / RESERVATION_FILE, config.in_flight_limit
    )
    progress, ledger = restore(pe, config, reservation.read())
    if pe.rank != 0:
        mark_holding()  # a signal must not end a rank mid-collective: rank 0 stops it
        return follow(pe)
    serve_metrics(config)
    tracking.start(config)  # TensorBoard / W&B, where [learner.tracking] names them
    bus = await Bus.connect(config.bus, name="aha-learner")
    leases = Leases(config.bus.scored.ack_wait_s)
    keep_alive = asyncio.create_task(leases.keep_alive())
    learner = Learner(
        config,
        pe,
        bus,
        StageConsumer(bus, SCORED),
        new_dispatcher(config, problems),
        ledger,
        leases,
        progress,
        reservation=reservation,
        uploads=await setup_uploads(bus.js, config, progress.version),
    )
    code, evals = 0, EvalJobs(config, pe)  # [learner.eval]: jobs of their own, not counted
    try:
        fit_payload(learner)
        await publish(learner)  # the current version, for actors that start (or restart) late
        learner.last_step_end = time.perf_counter()
        while not finished(learner) and not stop.is_set():
            if not await step(learner, stop):
                break
            await evals.after_step(progress.step, progress.version)
        await checkpoint(learner)  # whatever was trained since the last checkpoint
        await evals.finish(0.0 if stop.is_set() else None)  # a signal does not wait
        if finished(learner):
            await finish(learner)
        await settle_uploads(learner)
        log.info("learner stopped", step=progress.step, in_flight=ledger.in_flight)
    except NonFiniteSteps as e:
        await hand_back(learner)  # held groups come back; the last good checkpoint stays as it is
        await settle_uploads(learner)
        log.error("learner stopped", error=str(e), step=progress.step)
        code = 1
    finally:
        keep_alive.cancel()
        await bus.close()
    stop_followers()
    return code


def new_dispatcher(config: LearnerConfig, problems) -> Dispatcher:
    """The run's dispatcher; its task ids start with a key of the checkpoint folder, the
    dataset and its seed (the same after a restart)."""
    key = run_key(
        Path(config.checkpoint_dir).resolve(),
        Path(config.dataset.path).resolve(),
        config.dataset.seed,
    )
    return Dispatcher(config.dataset, problems, key)


def fit_payload(learner: Learner) -> None:
    """The server's max_payload must carry the configured groups; rows that cannot fit are
    noted (and skipped when their turn comes)."""
    learner.dispatcher.fit(learner.bus.nc.max_payload)
    if learner.dispatcher.too_large:
        log.warning(
            "dataset rows whose group cannot fit the bus are skipped",
            rows=len(learner.dispatcher.too_large),
            max_payload=learner.bus.nc.max_payload,
        )


async def hand_back(learner: Learner) -> None:
    """Release every held group not yet in a checkpoint (nak): they come back at once."""
    positions = sorted(learner.ledger.held)
    for p in positions:
        learner.ledger.release(p)
    await learner.leases.release(positions)
    learner.carried = []


def serve_metrics(config: LearnerConfig) -> None:
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)


def load_tokenizer(config: LearnerConfig):
    """The policy folder's tokenizer (prompts are sent tokenized); None for a `model.qwen2` policy."""
    if config.dataset is None:
        raise ConfigError("learner.dataset: aha learner needs a prompt dataset")
    if config.model.path is None:
        if config.dataset.template == "chat":
            raise ConfigError("learner.dataset.template: 'chat' needs model.path (its tokenizer)")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model.path)


def has_checkpoint(config: LearnerConfig) -> bool:
    return (Path(config.checkpoint_dir) / "latest").exists()


def restore(pe: PolicyEngine, config: LearnerConfig, reserved: int) -> tuple[Progress, Ledger]:
    """Continue from the latest checkpoint when there is one, else start afresh; `reserved`
    is how far positions may have been published (by a predecessor that crashed, too)."""
    if not has_checkpoint(config):
        return Progress(), Ledger(reserved=reserved)
    state = load_checkpoint(pe, config.checkpoint_dir)
    set_rng_state(state["rng"])
    if pe.rank == 0:
        write_records(config.metrics_file, state["records"])  # lines a crash kept from the file
    progress = Progress.from_state(state["progress"])
    log.info("resumed", checkpoint_dir=config.checkpoint_dir, **progress.state())
    return progress, Ledger.from_state(state["ledger"], reserved)


def finished(learner: Learner) -> bool:
    return (
        learner.config.max_steps is not None and learner.progress.step >= learner.config.max_steps
    )


async def step(learner: Learner, stop: asyncio.Event) -> bool:
    """Collect a batch, train on it, report, checkpoint and publish when due.

    Returns False when `stop` came while collecting (the partial batch is handed back).
    """
    started = time.perf_counter()
    collected = await collect(learner, stop)
    if collected is None:
        return False
    waited = time.perf_counter() - started
    trained = [g for g, outcome in collected if outcome == Outcome.TRAINED]
    if learner.config.grpo.shuffle_rewards:
        trained = shuffle_rewards(
            trained, random.Random(learner.config.seed * 1_000_003 + learner.progress.step)
        )
    batch = build_batch(trained, learner.config.grpo.scale)
    train_started = time.perf_counter()
    metrics = await asyncio.to_thread(collective, learner.pe, "train", batch)
    train_seconds = time.perf_counter() - train_started
    if "nonfinite" in metrics:
        await refuse_update(learner, collected, trained, metrics)
        return True
    learner.nonfinite_streak = 0
    version = learner.progress.version
    count(learner.progress, collected)
    learner.progress.step += 1
    learner.progress.version += 1
    # Wall time since the previous step ended: its checkpoint and publish count here.
    now = time.perf_counter()
    seconds, learner.last_step_end = now - learner.last_step_end, now
    record = step_record(learner, collected, version, metrics, train_seconds)
    record.update(step_seconds=seconds, wait_share=waited / seconds)
    report(learner, record)
    learner.uncommitted.append(record)
    if learner.progress.step % learner.config.checkpoint_every == 0:
        await checkpoint(learner)
    if learner.progress.step % learner.config.publish_every == 0:
        await publish(learner)
    return True


async def collect(learner: Learner, stop: asyncio.Event) -> list[tuple[Group, Outcome]] | None:
    """Pull scored groups until `batch` of them are trainable, issuing tasks as room frees.

    Dropped groups (stale, no reward, zero variance) are kept in the list with their outcome:
    they are acknowledged with the step's checkpoint, like trained ones.
    """
    config, ledger = learner.config, learner.ledger
    collected, learner.carried = learner.carried, []
    beat = time.monotonic()
    while sum(outcome == Outcome.TRAINED for _, outcome in collected) < config.batch:
        if time.monotonic() - beat > HEARTBEAT_S:  # other ranks wait in a collective meanwhile
            await asyncio.to_thread(collective, learner.pe, "noop")
            beat = time.monotonic()
        if stop.is_set():
            positions = [g.position for g, _ in collected]
            for p in positions:
                ledger.release(p)
            await learner.leases.release(positions)
            return None
        trainable = sum(outcome == Outcome.TRAINED for _, outcome in collected)
        # The groups this step already trains use up the bound too: a task issued now can be
        # trained fresh only within the next max_staleness + 1 versions, and this step has
        # taken `trainable` of their (max_staleness + 1) × batch places. (With η = 0 nothing
        # is issued until the step is done and its weights published: synchronous RL.)
        limit = config.in_flight_limit - trainable
        await forget_dead(learner)
        issued = await top_up(
            learner.bus,
            learner.dispatcher,
            ledger,
            limit,
            learner.progress.version,
            learner.reservation,
        )
        learner.progress.groups[Outcome.DROPPED_TOO_LARGE] += len(issued.too_large)
        wanted = config.batch - trainable
        for delivery in await learner.consumer.fetch(wanted, timeout=1.0):
            admitted = await admit(learner, delivery)
            if admitted is not None:
                collected.append(admitted)
    return collected


async def forget_dead(learner: Learner) -> None:
    """Free the in-flight places of this run's tasks that were dead-lettered on the way (a
    prompt that crashes every actor must not stall the dispatcher), and count them. The
    position in the dead-letter stream is checkpointed with the ledger."""
    if time.monotonic() - learner.dead_checked_at < 1.0:
        return
    learner.dead_checked_at = time.monotonic()
    try:
        letters = await learner.bus.dead_letters(after=learner.progress.dead_seq)
    except LEASE_ERRORS as e:  # the server restarting: read them on a later call
        log.warning("dead letters unavailable", error=repr(e))
        return
    for letter in letters:
        learner.progress.dead_seq = letter.dead_seq
        if letter.stage == SCORED.name and letter.error.startswith(FOREIGN):
            continue  # never issued (its id may be issued later, to a real task)
        try:
            tid = decode_named(letter.data, STAGES[letter.stage].message).task_id
        except (DecodeError, KeyError):  # refused for a bad field (a NaN reward): it still
            tid = peek_task_id(letter.data)  # names its task, whose place must be freed
        p = learner.dispatcher.position(tid) if tid is not None else None
        if p is not None and learner.ledger.lose(p):
            learner.progress.groups[Outcome.DEAD] += 1
            log.warning(
                "task dead-lettered: its place is freed",
                task_id=tid,
                stage=letter.stage,
                error=letter.error,
            )


async def admit(learner: Learner, delivery: Delivery) -> tuple[Group, Outcome] | None:
    """Hold a new scored group with its outcome; ack one already consumed at once.

    A group this run never issued is dead-lettered as foreign (and forgotten); one of an
    issued task that must not be trained on is dead-lettered and held as dead (it is
    acknowledged with the step's checkpoint).
    """
    scored: ScoredRollout = delivery.message
    p = learner.dispatcher.position(scored.task_id)
    if p is None:
        why = f"no task of this run has the id {scored.task_id}"
    elif p >= learner.ledger.reserved:
        why = f"{scored.task_id} was never issued"
    else:
        why = learner.dispatcher.mismatch(scored.rollout.task, p)
    if why is not None:
        await refuse_foreign(learner, delivery, why)
        return None
    outcome = learner.ledger.receive(p)
    if outcome == "new":
        learner.leases.held[p] = delivery
        group = Group.of(scored, p)
        tracking.remember(scored)  # for the samples table
        why = refusal(scored, learner.progress.version, vocab_size(learner.pe))
        if why is not None:
            if not await bury(learner, delivery, f"refused by the learner: {why}"):
                await release(learner, p)
                return None
            return group, Outcome.DEAD
        config = learner.config
        return group, judge(
            group, learner.progress.version, config.max_staleness, config.drop_zero_variance
        )
    if outcome == "held":  # redelivered while we hold it (lease lost): keep the newest handle
        learner.leases.held[p] = delivery
        return None
    log.warning(
        "duplicate scored group acked untrained", task_id=delivery.message.task_id, why=outcome
    )
    learner.progress.groups[Outcome.DUPLICATES] += 1
    try:
        await delivery.ack_sync()
    except LEASE_ERRORS as e:  # it comes back and is recognised again
        log.warning("ack failed", task_id=delivery.message.task_id, error=repr(e))
    return None


async def bury(learner: Learner, delivery: Delivery, reason: str) -> bool:
    """Put a scored group on the dead-letter subject with `reason` (it stays leased);
    False when the server could not take it (the caller hands the group back)."""
    meta = delivery.msg.metadata
    try:
        await learner.bus.dead_letter(
            SCORED,
            delivery.msg.data,
            reason,
            subject=delivery.msg.subject,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
        )
    except LEASE_ERRORS as e:  # the server away: the group comes back and is refused again
        log.warning("dead letter failed", task_id=delivery.message.task_id, error=repr(e))
        return False
    return True


async def release(learner: Learner, p: int) -> None:
    """Hand one held group back untrained (it comes back and is judged again)."""
    learner.ledger.release(p)
    await learner.leases.release([p])


async def refuse_foreign(learner: Learner, delivery: Delivery, why: str) -> None:
    """Dead-letter a group this run never issued and forget it (`term`): it takes no place."""
    if not await bury(learner, delivery, f"{FOREIGN}{why}"):
        return
    learner.progress.groups[Outcome.FOREIGN] += 1
    try:
        await delivery.term()
    except LEASE_ERRORS as e:  # it comes back and is refused again
        log.warning("term failed", task_id=delivery.message.task_id, error=repr(e))


def vocab_size(pe: PolicyEngine) -> int:
    return pe.module.get_input_embeddings().num_embeddings


async def refuse_update(
    learner: Learner, collected: list[tuple[Group, Outcome]], trained: list[Group], result: dict
) -> None:
    """An update applied nothing (non-finite loss or gradient): dead-letter the groups to
    blame, keep the others for the next attempt, stop after too many in a row."""
    owners = batch_owners(trained)
    blamed = {trained[owners[r]].position for r in result["rows"]}
    reason = (
        f"refused by the learner: non-finite {result['nonfinite']} in the update at "
        f"policy version {learner.progress.version}; nothing was applied"
    )
    for p in sorted(blamed):
        if not await bury(learner, learner.leases.held[p], reason):
            await release(learner, p)
    learner.carried = [
        (g, Outcome.DEAD if g.position in blamed else outcome)
        for g, outcome in collected
        if g.position in learner.leases.held
    ]
    learner.progress.steps_nonfinite += 1
    learner.nonfinite_streak += 1
    log.error(
        "update skipped: non-finite " + result["nonfinite"],
        step=learner.progress.step + 1,
        groups=len(blamed),
        in_a_row=learner.nonfinite_streak,
    )
    limit = learner.config.max_nonfinite_steps
    if learner.nonfinite_streak >= limit:
        raise NonFiniteSteps(
            f"{learner.nonfinite_streak} updates in a row had a non-finite {result['nonfinite']} "
            f"(learner.max_nonfinite_steps = {limit}); the last good checkpoint is in "
            f"{learner.config.checkpoint_dir}, the groups to blame in the dead letters"
        )


def count(progress: Progress, collected: list[tuple[Group, Outcome]]) -> None:
    for _, outcome in collected:
        progress.groups[outcome] += 1


async def checkpoint(learner: Learner) -> None:
    """Save a checkpoint containing every held group's effect, then acknowledge them.

    The steps' metrics lines are written once their checkpoint is saved (and kept in it, so
    a restart writes any a crash cut off): the metrics file holds exactly the committed steps.
    """
    if not learner.uncommitted:
        return
    learner.ledger.commit()
    state = {
        "progress": learner.progress.state(),
        "ledger": learner.ledger.state(),
        "rng": rng_state(),
        "records": learner.uncommitted,
    }
    fault_point("crash_before_checkpoint", learner.progress.step)
    tag = f"step{learner.progress.step}"
    await asyncio.to_thread(
        collective, learner.pe, "checkpoint", learner.config.checkpoint_dir, tag, state
    )
    fault_point("crash_before_ack", learner.progress.step)
    write_records(learner.config.metrics_file, learner.uncommitted)
    learner.uncommitted = []
    await learner.leases.ack_all()
    prune_checkpoints(learner.config.checkpoint_dir, KEEP_CHECKPOINTS)


def write_records(path: str | None, records: list[dict]) -> None:
    """Append the step lines the metrics file does not have yet (by step number)."""
    if path is None:
        return
    last = 0
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if row.get("event") == "step":
                last = max(last, row["step"])
    for record in records:
        if record["step"] > last:
            append_line(path, record)


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` `step{n}` checkpoint folders."""
    tags = sorted(
        (int(p.name[4:]), p)
        for p in Path(directory).glob("step*")
        if p.is_dir() and p.name[4:].isdigit()
    )
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


async def publish(learner: Learner) -> None:
    """Write the weights as shards (on the shared volume when set) and point `latest` at them
    (`aha_learner_weight_publish_seconds`: from here to the manifest visible; the store copy
    of a version served over HTTP follows in the background, `learner.uploads`)."""
    config, progress = learner.config, learner.progress
    started = time.perf_counter()
    directory, shared = version_dir(config.weights_dir, progress.version)
    shards = await asyncio.to_thread(
        collective,
        learner.pe,
        "write_shards",
        directory,
        config.serving_dtype,
        config.shard_mb,
        shared,
    )
    try:
        delay = 0.5
        while True:
            try:
                await publish_weights(
                    learner.bus.js,
                    directory,
                    shards,
                    version=progress.version,
                    step=progress.step,
                    dtype=config.serving_dtype,
                    keep_versions=config.keep_versions,
                    server=weight_server(config.weight_server),
                    uploads=learner.uploads,
                    policy=learner.dispatcher.key,  # versions count from 0 per learner
                    model=str(Path(config.model.path).resolve()),
                )
                break
            except LEASE_ERRORS as e:  # server restarting: the same version is offered again
                if delay > PUBLISH_RETRY_S:
                    raise
                log.warning("weight publish failed: retrying", error=repr(e), delay=delay)
                await asyncio.sleep(delay)
                delay *= 2
        WEIGHT_PUBLISH_SECONDS.set(time.perf_counter() - started)  # the manifest is visible
    finally:
        if not shared:
            shutil.rmtree(directory, ignore_errors=True)
    if shared:
        prune_dirs(config.weights_dir, config.keep_versions)
    progress.published_version = progress.version
    WEIGHT_PUBLISH_BYTES.set(sum(s.bytes for s in shards))


async def setup_uploads(js, config: LearnerConfig, version: int) -> StoreUploads | None:
    """The background store uploads of versions served over HTTP (None with the weight server
    off), once what an earlier run left is gone: the versions from `version` on, which this
    run publishes anew (`remove_stale_versions`), and the upload folders a learner killed
    mid-upload left on the shared volume (`remove_upload_leftovers`)."""
    await remove_stale_versions(js, config.weights_dir, version)
    remove_upload_leftovers(config.weights_dir)
    return StoreUploads(js, config.keep_versions) if config.weight_server.enabled else None


async def settle_uploads(learner: Learner) -> None:
    """Before the learner exits, let the background store upload of the last version end (at
    most `weight_server.upload_wait_s`), so an actor that joins later and cannot reach the
    learner over HTTP finds it in the store. Past the bound, or cut by a second signal or a
    kill, the upload stops: no object is left half written (an object exists only once its
    info follows its chunks; chunks already sent may stay in the store's stream unnamed)."""
    if learner.uploads is not None:
        await learner.uploads.drain(learner.config.weight_server.upload_wait_s)


def step_record(
    learner: Learner,
    collected: list[tuple[Group, Outcome]],
    version: int,
    metrics: dict,
    train_seconds: float,
) -> dict[str, Any]:
    """The step's canonical record: the metrics-file line (STEP_KEYS and more)."""
    progress = learner.progress
    fresh = [g for g, o in collected if o not in (Outcome.DROPPED_STALE, Outcome.DEAD)]
    trained = [g for g, o in collected if o == Outcome.TRAINED]
    samples = sample_stats(fresh)
    return {
        "event": "step",
        "step": progress.step,
        "version": progress.version,
        "reward": samples["reward"],
        "reward_std": samples["reward_std"],
        "rewards": {name: mean for name, (mean, _) in samples["components"].items()},
        "rewards_std": {name: std for name, (_, std) in samples["components"].items()},
        "accuracy": samples["accuracy"],
        "response_length": samples["response_length"],
        **{k: metrics[k] for k in ("loss", "kl", "clip_fraction", "ratio", "is_weight", "lr")},
        "behaviour_gap": metrics["behaviour_gap"],
        "optimizer_steps": metrics["optimizer_steps"],
        **staleness_stats(trained, version),
        **progress.counts(),
        IN_FLIGHT: learner.ledger.in_flight,
        "steps_nonfinite": progress.steps_nonfinite,
        "tasks_issued": learner.ledger.issued,
        "task_ids": [g.task_id for g in trained],
        "task_ids_dropped": [g.task_id for g, o in collected if o != Outcome.TRAINED],
        "tokens": metrics["tokens"],
        "tokens_per_s": metrics["tokens"] / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "time": time.time(),
    }


def report(learner: Learner, record: dict[str, Any]) -> None:
    """The canonical log line and the gauges (the metrics-file line waits for the checkpoint)."""
    export_gauges(record)
    brief = {k: record[k] for k in STEP_KEYS if k not in ("event", "time")}
    log.info(
        "step",
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in brief.items()},
        loss=round(record["loss"], 6),
    )


async def finish(learner: Learner) -> None:
    """At `max_steps`: final weights published, HF folder exported, the `done` line."""
    config, progress = learner.config, learner.progress
    if progress.published_version != progress.version:
        await publish(learner)
    final = None
    if config.final_model_dir:
        final = await asyncio.to_thread(
            collective,
            learner.pe,
            "export",
            config.final_model_dir,
            config.serving_dtype,
            config.shard_mb,
            config.model.path,
        )
    append_line(
        config.metrics_file,
        {
            "event": "done",
            "steps": progress.step,
            "tasks_issued": learner.ledger.issued,
            **progress.counts(),
            "steps_nonfinite": progress.steps_nonfinite,
            "groups_in_flight_at_stop": learner.ledger.in_flight,
            "final_model": str(final) if final else None,
            "time": time.time(),
        },
    )
    log.info("done", steps=progress.step, final_model=str(final) if final else None)
