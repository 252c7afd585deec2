"""Connect to NATS and create (or update) aha's streams, consumers and buckets.

`ensure_streams` is idempotent: every process may call it at start, and a changed setting
(ack wait, max deliver, limits) is applied to the existing stream or consumer in place.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from protocol.config import BusConfig
from protocol.names import (
    KV_POLICY,
    OBJECT_STORE_WEIGHTS,
    STAGES,
    STREAM_DEAD,
    SUBJECT_DEAD_ALL,
    inbox_prefix,
    scored_stage,
)

log = structlog.get_logger("protocol.streams")

POLICY_STREAM = f"KV_{KV_POLICY}"
"""The stream behind the policy KV bucket (nats-py's naming)."""


def _tls_context(config: BusConfig) -> ssl.SSLContext | None:
    if not (config.tls_ca_file or config.tls_cert_file):
        return None
    context = ssl.create_default_context(cafile=config.tls_ca_file)
    if config.tls_cert_file:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


async def connect(config: BusConfig, *, name: str = "aha", url: str | None = None) -> Client:
    """Open the process's one NATS connection (auth and TLS from `config`).

    Reconnects forever: a restarted server (same address) is picked up again, and JetStream
    keeps every message that was acknowledged to a publisher.
    """
    servers = url or config.resolved_url
    if not servers:
        raise ValueError("no NATS server: set bus.url, NATS_URL, or start an embedded one")

    async def on_error(e: Exception) -> None:
        log.warning("nats error", error=repr(e))

    options: dict = dict(
        servers=[s.strip() for s in servers.split(",")],
        name=name,
        connect_timeout=config.connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        tls=_tls_context(config),
        user=config.user,
        password=config.password,
        token=config.token,
        user_credentials=config.creds_file,
        inbox_prefix=inbox_prefix(config.user),  # replies only this user may subscribe to
    )
    if config.nkey_seed_file:
        options["nkeys_seed"] = config.nkey_seed_file
    return await nats.connect(**options)


def _stream_config(name: str, subject: str, config: BusConfig, **limits) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        subjects=[subject],
        storage=api.StorageType.FILE if config.storage == "file" else api.StorageType.MEMORY,
        num_replicas=config.replicas,
        duplicate_window=config.duplicate_window_s,
        **limits,
    )


async def _put_stream(js: JetStreamContext, stream: api.StreamConfig) -> None:
    try:
        await js.stream_info(stream.name)
    except NotFoundError:
        await js.add_stream(stream)
        log.debug("stream created", stream=stream.name)
        return
    await js.update_stream(stream)


async def ensure_streams(js: JetStreamContext, config: BusConfig) -> None:
    """Create or update the work-queue streams with their durable consumers, the dead-letter
    stream, the policy KV bucket and the weights object store."""
    for stage in STAGES.values():
        await _put_stage(js, config, stage)
    await _put_stream(
        js,
        _stream_config(
            STREAM_DEAD,
            SUBJECT_DEAD_ALL,
            config,
            retention=api.RetentionPolicy.LIMITS,
            max_age=config.dead_max_age_s,
        ),
    )
    await _put_weight_buckets(js, config)


async def _put_stage(js: JetStreamContext, config: BusConfig, stage) -> None:
    """A stage's work-queue stream and the durable consumer its replicas share."""
    settings = config.stage(stage.name)
    await _put_stream(
        js,
        _stream_config(
            stage.stream,
            stage.stream_subjects,
            config,
            retention=api.RetentionPolicy.WORK_QUEUE,
            max_age=settings.max_age_s,
            max_bytes=settings.max_bytes,
            discard=api.DiscardPolicy.NEW,  # a full queue refuses work instead of losing it
        ),
    )
    consumer = api.ConsumerConfig(
        name=stage.durable,
        durable_name=stage.durable,
        description=f"aha {stage.name}: shared by every {stage.durable} replica",
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        filter_subject=stage.subject,
    )
    # CONSUMER.CREATE with an existing name updates the mutable fields in place.
    await js.add_consumer(stage.stream, consumer)


async def _put_weight_buckets(js: JetStreamContext, config: BusConfig) -> None:
    """The policy KV bucket (manifests, `weights_history` kept) and the shards' object store."""
    storage = api.StorageType.FILE if config.storage == "file" else api.StorageType.MEMORY
    kv = api.KeyValueConfig(
        bucket=KV_POLICY, history=config.weights_history, replicas=config.replicas, storage=storage
    )
    try:
        await js.create_key_value(kv)
    except BadRequestError:  # exists with another config (e.g. history): update its stream
        info = await js.stream_info(f"KV_{KV_POLICY}")
        info.config.max_msgs_per_subject = config.weights_history
        await js.update_stream(info.config)
    try:
        await js.object_store(OBJECT_STORE_WEIGHTS)
    except Exception:
        # nats-py: the bucket name must be positional (config= fails, see issue 2 facts).
        await js.create_object_store(
            OBJECT_STORE_WEIGHTS, replicas=config.replicas, storage=storage
        )


async def ensure_job_consumer(
    js: JetStreamContext, config: BusConfig, job: str, *, ack_wait_s: float | None = None
) -> None:
    """Create (or update) the durable consumer job `job` reads its scored groups with: the
    scored stage's settings, filtered on `aha.scored.<job>` only."""
    stage = scored_stage(job)
    settings = config.stage(stage.name)
    await js.add_consumer(
        stage.stream,
        api.ConsumerConfig(
            name=stage.durable,
            durable_name=stage.durable,
            description=f"aha job {job}: its scored groups",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait_s or settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            max_ack_pending=settings.max_ack_pending,
            filter_subject=stage.subject,
        ),
    )


async def delete_job_consumer(js: JetStreamContext, job: str) -> None:
    """Remove a finished job's consumer (gone already is fine)."""
    stage = scored_stage(job)
    try:
        await js.delete_consumer(stage.stream, stage.durable)
    except NotFoundError:
        pass


async def wait_for_streams(
    js: JetStreamContext,
    streams: list[str] | None = None,
    *,
    every_s: float = 2.0,
    timeout_s: float | None = None,
) -> None:
    """Return once `streams` (default: every work-queue stream and the policy bucket's)
    exist; until then log one line (and one again each minute) and retry: a part started
    before the learner (or the set-up job) made them waits instead of exiting.
    `ensure_streams` makes the policy bucket after the stages, so a part allowed to look up
    only that one (an actor) waits on it alone."""
    names = streams or [stage.stream for stage in STAGES.values()] + [POLICY_STREAM]
    started = time.monotonic()
    logged = -60.0
    while True:
        missing = []
        for name in names:
            try:
                await js.stream_info(name)
            except NotFoundError:
                missing.append(name)
        if not missing:
            return
        waited = time.monotonic() - started
        if timeout_s is not None and waited > timeout_s:
            raise TimeoutError(f"streams still missing after {timeout_s:.0f} s: {missing}")
        if waited - logged >= 60.0:
            log.warning("waiting for the streams to be created", missing=missing)
            logged = waited
        await asyncio.sleep(every_s)
