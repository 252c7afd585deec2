"""`aha actor`: tasks in, rollouts out, weights swapped in as the learner publishes them.

    run()
      1. connect, start the engine on `actor.model`
      2. load the published `latest` weights, if any, before taking a task
      3. watch `latest`: each new version is fetched, verified and loaded between generations
      4. the stage loop: each task -> G completions -> one Rollout tagged with the version
      5. on SIGTERM: finish or release what is held, drain

Many actors share the `actors` durable consumer; a task an actor dies holding comes back to
another after the ack wait.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import structlog
from prometheus_client import Counter, Gauge

from actors.config import ActorConfig
from protocol.bus import Bus
from protocol.codec import DecodeError, decode
from protocol.config import load_config
from protocol.log import setup_logging
from protocol.messages import Rollout, Task, Timings, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, ROLLOUTS, TASKS
from protocol.stage import run_stage, stop_on_signals, watch_max_deliveries

log = structlog.get_logger("actors.service")

TOKENS = Counter("aha_actor_tokens_total", "Completion tokens generated", ["actor"])
PROMPTS = Counter("aha_actor_prompts_total", "Tasks turned into rollouts", ["actor"])
VERSION = Gauge("aha_actor_policy_version", "Policy version served", ["actor"])
LOAD_SECONDS = Gauge("aha_actor_weight_load_seconds", "Fetch + load time of the last weight version", ["actor"])
IDLE = Counter("aha_actor_idle_seconds_total", "Time with no task to generate", ["actor"])
REJECTED = Counter("aha_actor_weights_rejected_total", "Weight versions refused (corrupt or missing shards)", ["actor"])


class Actor:
    """The engine, the tokenizer and the bookkeeping one actor process needs."""

    def __init__(self, config: ActorConfig, engine, tokenizer, bus: Bus):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.bus = bus
        self.download_dir = config.download_dir or tempfile.mkdtemp(prefix="aha-actor-")
        self.busy = 0
        self.idle_since: float | None = time.monotonic()

    async def rollout(self, task: Task) -> Rollout:
        """G completions of one task with the weights served now."""
        picked = time.time()
        self._start_work()
        try:
            prompt_ids = (
                task.prompt_token_ids.tolist()
                if task.prompt_token_ids is not None
                else self.tokenizer(task.prompt)["input_ids"]
            )
            gen = await self.engine.generate(prompt_ids, task.sampling, task.group_size)
        finally:
            self._end_work()
        rollout = Rollout(
            task=task,
            policy_version=gen.policy_version,
            actor_id=self.config.actor_id,
            prompt_token_ids=prompt_ids,
            samples=gen.samples,
            timings=Timings(queued_seconds=max(0.0, picked - task.issued_at), generation_seconds=gen.seconds),
        )
        TOKENS.labels(self.config.actor_id).inc(gen.num_tokens)
        PROMPTS.labels(self.config.actor_id).inc()
        log.info(
            "rollout",
            task_id=task.task_id,
            policy_version=gen.policy_version,
            tokens=gen.num_tokens,
            seconds=round(gen.seconds, 3),
            tokens_per_s=round(gen.num_tokens / max(gen.seconds, 1e-9), 1),
        )
        return rollout

    def _start_work(self) -> None:
        if self.busy == 0 and self.idle_since is not None:
            IDLE.labels(self.config.actor_id).inc(time.monotonic() - self.idle_since)
            self.idle_since = None
        self.busy += 1

    def _end_work(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self.idle_since = time.monotonic()

    async def serve(self, manifest: WeightManifest) -> bool:
        """Fetch, verify and load `manifest` if it is newer than what is served."""
        from actors.weights import WeightsRejected, load_manifest

        if manifest.version <= self.engine.version:
            return False
        try:
            cost = await load_manifest(self.engine, self.bus.js, manifest, self.download_dir)
        except WeightsRejected as e:
            REJECTED.labels(self.config.actor_id).inc()
            log.error("weights rejected: still serving the old version", version=manifest.version,
                      serving=self.engine.version, reason=e.reason)  # fmt: skip
            return False
        VERSION.labels(self.config.actor_id).set(self.engine.version)
        LOAD_SECONDS.labels(self.config.actor_id).set(cost["fetch_seconds"] + cost["load_seconds"])
        log.info("weights loaded", **cost)
        return True

    async def follow_weights(self, kv) -> None:
        """Serve each new `latest` manifest as it is published (the newest one first)."""
        watcher = await kv.watch(KEY_LATEST)
        try:
            while True:
                entry = await watcher._updates.get()  # None marks "no more initial values"
                while not watcher._updates.empty():  # several published while loading: newest
                    entry = watcher._updates.get_nowait() or entry
                if entry is None or entry.value is None:
                    continue
                try:
                    manifest = decode(entry.value, WeightManifest)
                except DecodeError as e:
                    log.error("bad manifest in KV: ignored", error=str(e))
                    continue
                await self.serve(manifest)
        finally:
            await watcher.stop()


async def latest_manifest(kv) -> WeightManifest | None:
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(KEY_LATEST)
    except KeyNotFoundError:
        return None
    return decode(entry.value, WeightManifest)


async def run(config: ActorConfig) -> int:
    from transformers import AutoTokenizer

    from actors.engine import setup_engine

    bus = await Bus.connect(config.bus, name=f"aha-actor-{config.actor_id}")
    stop = stop_on_signals()
    kwargs = {"dtype": config.dtype}
    if config.backend == "vllm":
        kwargs.update(
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            gpu_memory_utilization=config.gpu_memory_utilization,
        )
    engine = await setup_engine(config.backend, config.model, **kwargs)
    actor = Actor(config, engine, AutoTokenizer.from_pretrained(config.model), bus)
    structlog.contextvars.bind_contextvars(actor_id=config.actor_id)
    try:
        kv = await bus.js.key_value(KV_POLICY)
        manifest = await latest_manifest(kv)
        if manifest is not None:  # started mid-run: catch up before the first task
            await actor.serve(manifest)
        VERSION.labels(config.actor_id).set(engine.version)
        follower = asyncio.create_task(actor.follow_weights(kv))
        advisories = await watch_max_deliveries(bus, TASKS)
        log.info("actor ready", backend=config.backend, policy_version=engine.version)
        stats = await run_stage(
            bus, TASKS, actor.rollout, output=ROLLOUTS, stop=stop, concurrency=config.concurrency
        )
        log.info("actor stopped", handled=stats.handled, released=stats.released, failed=stats.failed)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await advisories.unsubscribe()
    finally:
        await engine.close()
        await bus.close()
    return 0


def main(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"actor_id": args.actor_id, "model": args.model}.items() if v}
    if args.nats_url:
        overrides["bus"] = {"url": args.nats_url}
    config = load_config(ActorConfig, args.config, section="actor", overrides=overrides)
    setup_logging("actor", actor_id=config.actor_id)
    import torch

    torch.set_num_threads(1)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)
    return asyncio.run(run(config))
