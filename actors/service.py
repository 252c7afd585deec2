"""`aha actor`: tasks in, rollouts out, weights swapped in as the learner publishes them.

    run()
      1. start the engine on `actor.model`, then connect
      2. wait for the streams (a part started before the learner made them), then load the
         published `latest` weights, if any, before taking a task
      3. watch `latest`: each new version is fetched, verified and loaded between generations
      4. the stage loop: each task -> G completions -> one Rollout tagged with the version;
         a task naming a model folder (`Task.model`, a generation job's fixed model) is
         sampled with that folder's weights, reported as version 0
      5. on SIGTERM: finish what is held within `shutdown_grace_s`, release the rest, drain;
         before the first task (connecting, starting the engine, loading weights) it stops
         at once (`protocol.stage.stop_on_signals`)

Many actors share the `actors` durable consumer; a task an actor dies holding comes back to
another after the ack wait.

Switching models: the engine serves one model at a time. A task for another one waits for
the generations in flight; a folder of the engine's architecture and tokenizer is then loaded
in place (like a weight version), any other gets the engine started again on it (its
tokenizer too): the HF engine reloads in seconds, vLLM restarts its engine (and workers) in
this process, about as long as an actor's start. Back to the learner's policy, the actor's
own `model` is loaded again and `latest`. The actor's own folder needs no switch while no
learner weights were loaded over it. Tasks of different models interleaved on one actor each
pay a switch: give each job's actors their own pool, or let a job's window keep its tasks
together. A task naming a folder outside `model_dirs` is dead-lettered at once (`Refused`).

Learners one after another (a pipeline's grpo stages): a learner's tasks and manifests name
its policy (`Task.policy`, `WeightManifest.policy`), whose versions count from 0. Versions are
compared within a policy only; a new learner's policy is taken with its first task (its
`latest`, on the folder it started from where that is another architecture), and a task of a
policy no longer published is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

from actors.config import ActorConfig
from actors.weights import latest_manifest
from protocol.bus import Bus
from protocol.config import config_from_args
from protocol.log import setup_logging
from protocol.messages import Rollout, Task, Timings, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, ROLLOUTS, TASKS
from protocol.stage import (
    Refused,
    StageStats,
    Stopped,
    run_stage,
    stop_on_signals,
    watch_max_deliveries,
)
from protocol.streams import POLICY_STREAM, wait_for_streams
from protocol.weight_server import WeightServer

log = structlog.get_logger("actors.service")

_TRANSIENT = (NatsTimeoutError, asyncio.TimeoutError)

TOKENS = Counter("aha_actor_tokens_total", "Completion tokens generated", ["actor"])
PROMPTS = Counter("aha_actor_prompts_total", "Tasks turned into rollouts", ["actor"])
VERSION = Gauge("aha_actor_policy_version", "Policy version served", ["actor"])
LOAD_SECONDS = Gauge(
    "aha_actor_weight_load_seconds", "Fetch + load time of the last weight version", ["actor"]
)
REJECTED = Counter(
    "aha_actor_weights_rejected_total",
    "Weight versions refused (corrupt or missing shards)",
    ["actor"],
)


class IdleClock:
    """Seconds during which no task was in the engine: the actor starved of tasks.

    Read when Prometheus scrapes (`aha_actor_idle_seconds_total`), so a stretch without
    tasks shows while it lasts, not only once the next task arrives.
    """

    def __init__(self) -> None:
        self.busy = 0
        self._idle = 0.0
        self._since = time.monotonic()

    def start(self) -> None:
        if self.busy == 0:
            self._idle += time.monotonic() - self._since
        self.busy += 1

    def end(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._since = time.monotonic()

    @property
    def seconds(self) -> float:
        return self._idle + (time.monotonic() - self._since if self.busy == 0 else 0.0)


class _IdleCollector:
    def __init__(self, actor_id: str, clock: IdleClock):
        self.actor_id = actor_id
        self.clock = clock

    def collect(self):
        family = CounterMetricFamily(
            "aha_actor_idle_seconds", "Time with no task in the engine", labels=["actor"]
        )
        family.add_metric([self.actor_id], self.clock.seconds)
        yield family


class Actor:
    """The engine, the tokenizer and the bookkeeping one actor needs (in a process or a test)."""

    def __init__(self, config: ActorConfig, engine, tokenizer, bus: Bus):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.bus = bus
        self._own_download_dir = config.download_dir is None
        self.download_dir = config.download_dir or tempfile.mkdtemp(prefix="aha-actor-")
        self.relay = (
            WeightServer(config.weight_server).start() if config.weight_server.enabled else None
        )
        """Passes the shards this actor fetches on to other actors (`protocol.weight_server`)."""
        self.idle = IdleClock()
        self.rejected: set[tuple[str, int, float]] = set()
        """Manifests (policy, version, time written) refused once: a later notification does not
        fetch them again (a restarted learner's new manifest of that version is tried)."""
        self.policy: str | None = None
        """The learner policy whose weights the engine holds (`WeightManifest.policy`); None:
        the folder's own (version 0), or a learner that names none."""
        self.published: str | None = None
        """The policy of the `latest` manifest last read: a task of another one is refused."""
        self.kv = None
        """The policy KV bucket, once `run` has opened it."""
        self._loading = asyncio.Lock()
        self.serving: str | None = None
        """The model folder served for tasks that name one; None: the learner's policy."""
        self.engine_model = str(Path(config.model).resolve())
        """The folder the engine was started on (its architecture and tokenizer)."""
        self.weights_of: str | None = self.engine_model
        """The folder whose own weights the engine holds (version 0); None: a learner's."""
        self._switch = asyncio.Condition()
        self._active = 0
        """Generations running on the model served now (a switch waits for none)."""
        self.tracker = open_tracker(config)
        """TensorBoard / W&B, where `[actor.tracking]` names them; None otherwise."""
        self.rollouts = 0
        """Rollouts made: the step axis of what is tracked."""

    def allowed(self, model: str) -> str:
        """The resolved folder of a task's `model`; `Refused` (dead-lettered at once) unless it
        is the actor's own `model` or under one of `model_dirs`, ValueError without a model."""
        folder = Path(model).resolve()
        roots = [
            Path(self.config.model).resolve(),
            *(Path(d).resolve() for d in self.config.model_dirs),
        ]
        if not any(folder == root or folder.is_relative_to(root) for root in roots):
            raise Refused(f"model {model!r} is not under actor.model_dirs")
        if not (folder / "config.json").is_file():
            raise ValueError(f"model {model!r} has no config.json")
        return str(folder)

    async def _use(self, task: Task) -> None:
        """Serve what `task` asks for (a fixed folder, a learner's policy, or whatever learner
        policy is served) for one more generation; a switch waits for none in flight."""
        want = None if task.model is None or task.policy else self.allowed(task.model)
        policy = task.policy

        def served() -> bool:
            return self.serving == want and (policy is None or policy == self.policy)

        async with self._switch:
            await self._switch.wait_for(lambda: served() or self._active == 0)
            if not served():
                await self._serve_model(want, policy)
            self._active += 1

    async def _done(self) -> None:
        async with self._switch:
            self._active -= 1
            self._switch.notify_all()

    async def _serve_model(self, want: str | None, policy: str | None) -> None:
        """Switch the idle engine to the folder `want`, or (None) to the learner's `policy`
        (None: the one served before, else the actor's own `model` and `latest`)."""
        async with self._loading:
            if want is not None:
                await self._hold_folder(want)
            elif policy is not None:
                await self._take_policy(policy)
            elif self.policy is None:
                await self._hold_folder(str(Path(self.config.model).resolve()))
            self.serving = want
        if want is None and self.kv is not None:
            await self.serve_latest(self.kv)

    async def _hold_folder(self, folder: str) -> None:
        """The engine with `folder`'s own weights as version 0: loaded in place when its
        architecture and tokenizer are the engine's, else the engine started again on it."""
        if self.weights_of == folder and self.engine.version == 0:
            return
        if same_architecture(folder, self.engine_model):
            log.info("switching model", serving=folder, was=self.weights_of, in_place=True)
            await self.engine.load_weights(folder, 0)
        else:
            from transformers import AutoTokenizer

            log.info("switching model", serving=folder, was=self.engine_model)
            await self.engine.close()
            self.engine = await setup_actor_engine(self.config, folder)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.engine_model = folder
        self.weights_of, self.policy = folder, None

    async def _take_policy(self, policy: str) -> None:
        """Serve the learner `policy`'s published weights (a pipeline's next stage: its learner
        counts versions from 0 again), on its own folder where that is another architecture.
        `Refused` when `latest` is another policy's: the task's learner is gone."""
        manifest = await latest_manifest(self.kv) if self.kv is not None else None
        self.published = manifest.policy if manifest is not None else None
        if manifest is None or manifest.policy != policy:
            raise Refused(f"policy {policy!r} is not the one published ({self.published!r})")
        base = self.other_architecture(manifest)
        if base is not None:
            await self._hold_folder(self.allowed(base))
        log.info("taking a learner's policy", policy=policy, version=manifest.version)
        if self.relay is not None:
            self.relay.forget(0)  # another learner's versions: their numbers start again
        self.policy, self.weights_of = policy, None
        if not await self.serve(manifest, force=True):
            self.policy = None  # nothing of it loaded: the next task tries again
            raise RuntimeError(f"policy {policy!r}: version {manifest.version} not loaded")

    def other_architecture(self, manifest: WeightManifest) -> str | None:
        """The folder `manifest`'s policy started from, when it is on this machine and not the
        engine's architecture (its weights would not load in place); None otherwise."""
        if manifest.model is None or not (Path(manifest.model) / "config.json").is_file():
            return None  # another machine's path: the weights load or are refused as they are
        model = str(Path(manifest.model).resolve())
        return None if same_architecture(model, self.engine_model) else model

    async def rollout(self, task: Task) -> Rollout:
        """G completions of one task with the weights served now (or its model's)."""
        await self._use(task)
        try:
            return await self._rollout(task)
        finally:
            await self._done()

    async def _rollout(self, task: Task) -> Rollout:
        picked = time.time()
        learner = task.model is None or task.policy is not None
        if learner and task.issued_version > self.engine.version and self.kv:
            # Issued after weights we do not serve yet (their KV notice has not come): serve
            # them first, so no rollout is older than its task and η holds from the start.
            await self.serve_latest(self.kv)
        if task.policy is not None and self.published not in (None, task.policy):
            raise Refused(f"policy {task.policy!r} is not the one published ({self.published!r})")
        prompt_ids = (
            task.prompt_token_ids.tolist()
            if task.prompt_token_ids is not None
            else self.tokenizer(task.prompt)["input_ids"]
        )
        self.idle.start()
        try:
            gen = await self.engine.generate(prompt_ids, task.sampling, task.group_size)
        finally:
            self.idle.end()
        rollout = Rollout(
            task=task,
            policy_version=gen.policy_version,
            actor_id=self.config.actor_id,
            prompt_token_ids=prompt_ids,
            samples=gen.samples,
            timings=Timings(
                queued_seconds=max(0.0, picked - task.issued_at), generation_seconds=gen.seconds
            ),
        )
        TOKENS.labels(self.config.actor_id).inc(gen.num_tokens)
        PROMPTS.labels(self.config.actor_id).inc()
        self.rollouts += 1
        self.track(
            tokens=gen.num_tokens,
            tokens_per_s=gen.num_tokens / max(gen.seconds, 1e-9),
            generation_seconds=gen.seconds,
            queued_seconds=rollout.timings.queued_seconds,
            policy_version=gen.policy_version,
        )
        log.info(
            "rollout",
            task_id=task.task_id,
            job=task.job,
            policy_version=gen.policy_version,
            tokens=gen.num_tokens,
            seconds=round(gen.seconds, 3),
            tokens_per_s=round(gen.num_tokens / max(gen.seconds, 1e-9), 1),
        )
        return rollout

    async def serve(self, manifest: WeightManifest, force: bool = False) -> bool:
        """Fetch, verify and load `manifest` if it is newer than what is served of its policy
        (`force`: whatever is served). Another learner's policy waits for its first task.

        Returns whether it is now served. A refused version is logged, counted and remembered;
        the engine keeps serving what it had.
        """
        from actors.weights import WeightsRejected, load_manifest

        key = (manifest.policy, manifest.version, manifest.created_at)
        if self.policy is not None and manifest.policy != self.policy or key in self.rejected:
            return False
        if not force and manifest.version <= self.engine.version:
            return False
        if not force and self.policy is None and self.other_architecture(manifest):
            return False  # a policy on another architecture: taken on with its first task
        try:
            cost = await load_manifest(
                self.engine,
                self.bus.js,
                manifest,
                self.download_dir,
                relay=self.relay,
                http=self.config.weight_server,
            )
        except WeightsRejected as e:
            self.rejected.add(key)
            REJECTED.labels(self.config.actor_id).inc()
            log.error(
                "weights rejected: still serving the old version",
                version=manifest.version,
                serving=self.engine.version,
                reason=e.reason,
            )
            return False
        self.policy, self.weights_of = manifest.policy or None, None
        VERSION.labels(self.config.actor_id).set(self.engine.version)
        LOAD_SECONDS.labels(self.config.actor_id).set(cost["fetch_seconds"] + cost["load_seconds"])
        self.track(
            weights_fetch_seconds=cost["fetch_seconds"],
            weights_load_seconds=cost["load_seconds"],
            policy_version=self.engine.version,
            every=False,
        )
        log.info("weights loaded", **cost)
        return True

    async def follow_weights(self, kv) -> None:
        """Serve each new `latest` manifest as it is published.

        A watcher entry only says that `latest` changed; the current value is read when the
        entry is handled, so versions published during a slow load are skipped for the newest
        (the entries they left behind then find nothing newer to do). Starting the watch
        retries while NATS times out: a server killed just as the actor starts must not stop
        it (its first entry, the current value, catches up on what was published meanwhile).
        """
        retry_s = 0.5
        while True:
            try:
                watcher = await kv.watch(KEY_LATEST, ignore_deletes=True)
                break
            except _TRANSIENT as e:
                log.warning("weights watch failed: retrying", error=repr(e), delay=retry_s)
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, 30.0)
        try:
            async for entry in watcher:
                if entry is not None:  # None marks the end of the initial values
                    await self.serve_latest(kv)
        finally:
            await watcher.stop()

    async def serve_latest(self, kv, retry_s: float = 0.5) -> None:
        """Serve the manifest under `latest` now, retrying while NATS times out. One load
        at a time: the watcher and tasks that outran it may ask at once."""
        while True:
            try:
                async with self._loading:
                    manifest = await latest_manifest(kv)
                    self.published = manifest.policy if manifest is not None else None
                    if self.serving is not None:  # a fixed model now: latest when back
                        return
                    if manifest is not None:
                        await self.serve(manifest)
                return
            except _TRANSIENT as e:  # the server restarting: try again, then the newest
                log.warning("weights fetch failed: retrying", error=repr(e), delay=retry_s)
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, 30.0)

    async def run(self, stop: asyncio.Event, *, max_messages: int | None = None) -> StageStats:
        """Catch up with `latest`, then turn tasks into rollouts until `stop`; follow weights."""
        await wait_for_streams(self.bus.js, [POLICY_STREAM])  # all its NATS user may look up
        kv = self.kv = await self.bus.js.key_value(KV_POLICY)
        await self.serve_latest(kv)  # started mid-run: serve the current policy from the first task
        VERSION.labels(self.config.actor_id).set(self.engine.version)
        follower = asyncio.create_task(self.follow_weights(kv))
        collector = _IdleCollector(self.config.actor_id, self.idle)
        REGISTRY.register(collector)
        advisories = None
        try:
            advisories = await watch_max_deliveries(self.bus, TASKS)
            log.info("actor ready", backend=self.config.backend, policy_version=self.engine.version)
            stage = asyncio.create_task(
                run_stage(
                    self.bus,
                    TASKS,
                    self.rollout,
                    output=ROLLOUTS,
                    stop=stop,
                    concurrency=self.config.concurrency,
                    grace_s=self.config.shutdown_grace_s,
                    max_messages=max_messages,
                )
            )
            # Following weights must not die quietly: an actor serving a frozen version
            # would look healthy. Its failure stops the loop and propagates.
            await asyncio.wait({stage, follower}, return_when=asyncio.FIRST_COMPLETED)
            if follower.done():
                stop.set()
                stats = await stage
                follower.result()  # raises what stopped it
                raise RuntimeError("the weight watcher ended")
            stats = stage.result()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            REGISTRY.unregister(collector)
            if advisories is not None:
                await advisories.unsubscribe()
        log.info(
            "actor stopped",
            handled=stats.handled,
            released=stats.released,
            failed=stats.failed,
            policy_version=self.engine.version,
        )
        return stats

    def track(self, *, every: bool = True, **values: float) -> None:
        """Numbers at the current rollout count to the tracker: every `every_n_steps`-th
        rollout's, or (not `every`: a weight load) whenever they come."""
        if self.tracker is not None:
            self.tracker.log_step({"step": self.rollouts, **values}, every=every)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.relay is not None:
            self.relay.close()
        if self._own_download_dir:
            shutil.rmtree(self.download_dir, ignore_errors=True)


def open_tracker(config: ActorConfig):
    """The actor's `protocol.tracking.Tracker` (its own TensorBoard folder and W&B run, named
    by its id), or None when `[actor.tracking]` names no backend."""
    if not config.tracking.backends:
        return None
    from protocol.tracking import Tracker

    root = Path(config.tracking.dir or "tracking")
    run_config = config.model_dump(mode="json", exclude={"bus"})
    return Tracker(config.tracking, root, run_config, name=config.actor_id)


ARCHITECTURE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""Files that must be equal (with config.json) for one folder's weights to load in place of
another's: the tokenizer the engine encodes and decodes with."""
CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
"""config.json keys that do not change what an engine runs."""


def same_architecture(a: str, b: str) -> bool:
    """Whether folder `a`'s weights can be loaded into an engine started on folder `b`: the
    same config.json (names and versions aside) and the same tokenizer files."""
    import json

    if a == b:
        return True
    try:
        configs = [json.loads((Path(f) / "config.json").read_text()) for f in (a, b)]
    except (OSError, ValueError):
        return False
    first, second = ({k: v for k, v in c.items() if k not in CONFIG_NOISE} for c in configs)
    if first != second:
        return False
    for name in ARCHITECTURE_FILES:
        files = [Path(a) / name, Path(b) / name]
        if files[0].is_file() != files[1].is_file():
            return False
        if files[0].is_file() and files[0].read_bytes() != files[1].read_bytes():
            return False
    return True


async def setup_actor_engine(config: ActorConfig, model: str | None = None):
    """The engine `config` asks for, serving `model` (default `config.model`) as version 0."""
    from actors.backends import setup_engine

    kwargs = {"dtype": config.dtype}
    if config.backend == "vllm":
        kwargs.update(
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.gpus,
        )
    return await setup_engine(config.backend, model or config.model, **kwargs)


async def run(config: ActorConfig, stop: asyncio.Event | None = None) -> int:
    stop = stop_on_signals(stop)  # first: a signal while connecting or loading stops at once
    from transformers import AutoTokenizer

    structlog.contextvars.bind_contextvars(actor_id=config.actor_id)
    # The engine first: its start blocks the event loop (minutes on a busy CPU), and a NATS
    # connection opened before would miss the server's pings and be dropped meanwhile.
    engine = await setup_actor_engine(config)
    actor = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        bus = await Bus.connect(config.bus, name=f"aha-actor-{config.actor_id}")
        try:
            actor = Actor(config, engine, tokenizer, bus)
            try:
                await actor.run(stop)
            finally:
                actor.close()
        finally:
            await bus.close()
    finally:
        await (engine if actor is None else actor.engine).close()  # the one it serves now
    return 0


def main(args: argparse.Namespace) -> int:
    flags = {"actor_id": args.actor_id, "model": args.model, "bus.url": args.nats_url}
    config = config_from_args(ActorConfig, args, "actor", flags)
    setup_logging("actor", actor_id=config.actor_id)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)
    try:
        return asyncio.run(run(config))
    except Stopped as e:
        log.info("actor stopped before its first task", signal=e.signal)
        return 0
