"""`aha generate`: k samples of every prompt from a model folder, through the bus, scored by
the rewarders, written as a samples file (`pipeline.samples`) one problem per line.

A generation job is a job on the bus (`protocol.names`): its tasks share `aha.tasks` with
any training run, its scored groups come back on `aha.scored.<job>` to its own durable
consumer, and at most `window` of its tasks are in flight, so a large evaluation never
floods the actors ahead of training (both queue behind each other in one stream) and
training never starves it.

    generate()
      1. check every prompt and the output file (before any server or model starts)
      2. the bus: `nats_url`'s (its actors and rewarders already running), or an embedded
         server with an actor and a rewarder of its own (`deploy.supervisor`, as `aha up`)
      3. the job's consumer; with `resume`, the problems already written are skipped
      4. publish tasks while fewer than `window` are in flight; each scored group is held
         until its problem is complete, then the line is written and fsynced, *then* its
         groups are acked: a crash loses no sample and `resume` duplicates none
      5. delete the job's consumer

Task ids are `<job>-<problem>-<chunk>` (k above `group_limit` is split into chunks), and the
job's name is derived from the output file and the settings, so a resumed run re-publishes
the same ids (the server's duplicate window drops them) and reads the groups a killed run
left on its consumer. A task the bus dead-letters (an actor that cannot serve the model,
a rollout no rewarder can score) fails the run with its reason; the lines written stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from protocol.config import BusConfig, ConfigError
from protocol.messages import Sampling, ScoredRollout, Task

log = structlog.get_logger("pipeline.generate")

LINE_FIELDS = ("id", "bench", "prompt", "reference")
"""The fields of a problem a samples line carries (in this order) besides its samples."""

JOB_ACK_WAIT_S = 30.0
"""Ack wait of a job's consumer (at most; `bus.scored.ack_wait_s` if shorter): the groups a
killed run held come back to its `--resume` within this; a running job keeps the groups it
holds with `in_progress` every third of it."""


class GenerateError(RuntimeError):
    """The job cannot finish (a task dead-lettered, a part that died); the lines written so
    far stay and `resume` continues from them."""


def generate(
    model: str | Path,
    problems: Sequence[Mapping[str, Any]],
    *,
    k: int,
    sampling: Sampling,
    rewards: Mapping[str, float],
    out: str | Path,
    nats_url: str | None = None,
    resume: bool = False,
    meta: Mapping[str, Any] | None = None,
    job: str | None = None,
    window: int = 64,
    group_limit: int = 16,
    actors: int = 1,
    rewarders: int = 1,
    engine: str | None = None,
    bus: BusConfig | None = None,
    progress: bool = False,
) -> Path:
    """Sample `k` completions of every problem (`{"id", "prompt", "reference"}`, optional
    `"bench"`; the prompt is given to the model as it is) from the model folder `model` with
    `sampling`, score them with `rewards` (name -> weight, as `Task.rewards`), and write one
    samples line per problem to `out` (in the order they complete). Returns `out`.

    `nats_url`: use the actors and rewarders on that bus (they must be allowed to serve
    `model`: `actor.model_dirs`); None: start an embedded server, `actors` actors (`engine`:
    `vllm` if installed, else `hf`) and `rewarders` rewarders for this call. `resume`:
    keep `out`'s complete lines and generate only the rest (without it an existing `out` is
    refused). `meta` goes to every task (e.g. `{"answer_tag": True}`). `job`: the job's name
    (default: derived from `out` and the settings). At most `window` tasks are in flight;
    `sampling.seed`, when set, seeds every task (each its own seed derived from it).

    Raises `ConfigError` for bad input before anything starts, `GenerateError` when the job
    cannot finish.
    """
    plan = Plan.of(
        model, problems, k, sampling, rewards, out, meta, job, group_limit, local=nats_url is None
    )
    if window < 1:
        raise ConfigError(f"window: {window}, must be at least 1")
    done = plan.check_output(resume)
    bus = bus or BusConfig()
    if len(done) == len(plan.problems):
        log.info("every problem is already written", out=str(plan.out))
        return plan.out
    if nats_url is not None:
        config = bus.model_copy(update={"url": nats_url})
        asyncio.run(collect(plan, done, config, window, progress, embedded=False))
        return plan.out
    with local_bus(plan, bus, actors, rewarders, engine) as (config, supervisor):
        asyncio.run(collect(plan, done, config, window, progress, supervisor=supervisor))
    return plan.out


# -- the plan: problems, tasks and the output file --------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a generation job does, checked: its problems, tasks, and where lines go."""

    model: str
    problems: list[dict[str, Any]]
    k: int
    sampling: Sampling
    rewards: dict[str, float]
    out: Path
    meta: dict[str, Any]
    job: str
    chunks: list[int]
    """Samples per task of a problem: k split into tasks of at most `group_limit`."""

    @classmethod
    def of(
        cls, model, problems, k, sampling, rewards, out, meta, job, group_limit, *, local=True
    ) -> Plan:
        """The checked plan; `local`: the model folder must be here (else it is the actors'
        path, sent as it is)."""
        from protocol.names import check_job
        from rewarder.rewards import REWARDS

        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"--k: {k}, must be at least 1")
        if group_limit < 1:
            raise ConfigError(f"group_limit: {group_limit}, must be at least 1")
        unknown = sorted(set(rewards) - set(REWARDS))
        if not rewards or unknown:
            raise ConfigError(
                f"--rewards: unknown {unknown or 'none given'}; known: {', '.join(REWARDS)}"
            )
        for name, weight in rewards.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"--rewards: {name}'s weight {weight!r} is not a finite number")
        rows = check_problems(problems)
        out = Path(out)
        folder = Path(model)
        if local:
            if not (folder / "config.json").is_file():
                raise ConfigError(f"--model: no config.json in {folder} (an HF model folder)")
            model = str(folder.resolve())
        elif (folder / "config.json").is_file():  # here too: the actors share this machine's path
            model = str(folder.resolve())
        elif not folder.is_absolute():
            raise ConfigError(f"--model: {model} must be an absolute path on the actors' machines")
        model = str(model)
        settings = json.dumps(
            [
                model,
                k,
                sampling.model_dump(),
                dict(rewards),
                dict(meta or {}),
                [p["id"] for p in rows],
            ],
            sort_keys=True,
            default=str,
        )
        job = (
            job or "gen-" + hashlib.sha256(f"{out.resolve()}|{settings}".encode()).hexdigest()[:16]
        )
        try:
            check_job(job)
        except ValueError as e:
            raise ConfigError(f"--job: {e}") from None
        n_chunks = -(-k // group_limit)
        chunks = [k // n_chunks + (i < k % n_chunks) for i in range(n_chunks)]
        return cls(model, rows, k, sampling, dict(rewards), out, dict(meta or {}), job, chunks)

    def task_id(self, index: int, chunk: int) -> str:
        return f"{self.job}-{index}-{chunk}"

    def position(self, task_id: str) -> tuple[int, int] | None:
        """(problem index, chunk) of a task of this job, None for another's."""
        prefix, sep, rest = task_id.partition(f"{self.job}-")
        index, _, chunk = rest.partition("-")
        if prefix or not sep or not index.isdigit() or not chunk.isdigit():
            return None
        index, chunk = int(index), int(chunk)
        if index >= len(self.problems) or chunk >= len(self.chunks):
            return None
        return index, chunk

    def task(self, index: int, chunk: int, model: str | None) -> Task:
        problem = self.problems[index]
        sampling = self.sampling
        if sampling.seed is not None:  # one seed per task, derived: chunks must differ
            digest = hashlib.sha256(f"{sampling.seed}|{problem['id']}|{chunk}".encode())
            sampling = sampling.model_copy(update={"seed": int(digest.hexdigest()[:8], 16)})
        return Task(
            task_id=self.task_id(index, chunk),
            prompt_id=problem["id"],
            prompt=problem["prompt"],
            reference=problem["reference"],
            rewards=self.rewards,
            group_size=self.chunks[chunk],
            sampling=sampling,
            issued_version=0,
            meta=self.meta,
            job=self.job,
            model=model,
        )

    def check_output(self, resume: bool) -> set[int]:
        """The indexes of the problems `out` already has (resume), after checking that `out`
        can be written; a half-written last line is cut off."""
        if self.out.is_dir():
            raise ConfigError(f"-o: {self.out} is a directory")
        if not self.out.exists():
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"-o: cannot make {self.out.parent}: {e.strerror}") from None
            return set()
        if not resume:
            raise ConfigError(f"-o: {self.out} exists; --resume continues it")
        return self.read_done()

    def read_done(self) -> set[int]:
        index = {p["id"]: i for i, p in enumerate(self.problems)}
        done: set[int] = set()
        data = self.out.read_bytes()
        keep = data.rfind(b"\n") + 1  # a last line without its newline was never finished
        for number, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
            where = f"({self.out}:{number})"
            try:
                row = json.loads(line)
                pid, count = row["id"], len(row["samples"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"not a samples line {where}") from None
            if pid not in index:
                raise ConfigError(f"id: {pid!r} is not one of the prompts {where}")
            if count != self.k or index[pid] in done:
                raise ConfigError(f"id: {pid!r} has {count} samples or is repeated {where}")
            done.add(index[pid])
        if keep < len(data):
            log.warning("half-written last line dropped", out=str(self.out))
            with open(self.out, "r+b") as f:
                f.truncate(keep)
        return done


def check_problems(problems: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The problems as plain dicts of `LINE_FIELDS`; `ConfigError` naming the problem and
    field for a missing prompt or reference, a non-string prompt, or an id given twice."""
    rows, seen = [], set()
    for number, problem in enumerate(problems):
        where = f"problem {number}"
        if not isinstance(problem, Mapping):
            raise ConfigError(f"{where}: not an object")
        for name in ("id", "prompt", "reference"):
            if name not in problem:
                raise ConfigError(f"{where}: no field {name!r}")
        pid = problem["id"]
        if not isinstance(pid, str) or not pid:
            raise ConfigError(f"{where}: id {pid!r} is not a non-empty string")
        if not isinstance(problem["prompt"], str):
            raise ConfigError(f"{where} ({pid}): prompt is not a string")
        if pid in seen:
            raise ConfigError(f"{where}: id {pid!r} is given twice")
        seen.add(pid)
        rows.append({name: problem[name] for name in LINE_FIELDS if name in problem})
    if not rows:
        raise ConfigError("no problems to generate for")
    return rows


def sample_line(scored: Sequence[ScoredRollout]) -> list[dict[str, Any]]:
    """The samples of a problem's scored groups (in chunk order), as samples-file entries."""
    samples = []
    for group in scored:
        for sample, score in zip(group.rollout.samples, group.scores, strict=True):
            samples.append(
                {
                    "text": sample.text,
                    "n_tokens": len(sample.token_ids),
                    "finish_reason": sample.finish_reason,
                    "reward": score.reward,
                    "components": score.components,
                    "answer": score.answer,
                    "error": score.error,
                    "policy_version": group.rollout.policy_version,
                }
            )
    return samples


# -- the collector ----------------------------------------------------------------------------


@dataclass
class Collector:
    """The job's bookkeeping: which tasks are out, which groups are held, which are written."""

    plan: Plan
    done: set[int]
    queue: list[tuple[int, int]] = field(default_factory=list)
    """(problem, chunk) still to publish, in order."""
    out_now: set[tuple[int, int]] = field(default_factory=set)
    """Published, group not yet received: the job's in-flight window."""
    held: dict[int, dict[int, Any]] = field(default_factory=dict)
    """problem -> chunk -> delivery of its scored group (acked once the line is written)."""
    ack_wait_s: float = JOB_ACK_WAIT_S
    touched_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.queue = [
            (i, c)
            for i in range(len(self.plan.problems))
            if i not in self.done
            for c in range(len(self.plan.chunks))
        ]
        self.queue.reverse()  # pop() from the end: problems in file order

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.plan.problems)

    async def keep_held(self) -> None:
        """Renew the lease of every group held for an incomplete problem."""
        if time.monotonic() - self.touched_at < self.ack_wait_s / 3:
            return
        self.touched_at = time.monotonic()
        for groups in self.held.values():
            for delivery in groups.values():
                await delivery.in_progress()

    async def top_up(self, bus, window: int, model: str | None) -> None:
        from protocol.names import TASKS

        while self.queue and len(self.out_now) < window:
            index, chunk = self.queue[-1]
            await bus.publish(TASKS, self.plan.task(index, chunk, model))
            self.queue.pop()
            self.out_now.add((index, chunk))

    async def receive(self, bus, delivery, f) -> bool:
        """Hold a scored group; write its problem's line once complete. Returns whether a
        line was written. A group of a problem written already, or another copy of a chunk
        held (a task published again), is acked and dropped; the same message redelivered
        (its lease ran out) replaces the handle held."""
        scored: ScoredRollout = delivery.message
        where = self.plan.position(scored.task_id)
        if where is None:  # on this job's subject but not its task: refuse it
            await bus.dead_letter(
                delivery.stage,
                delivery.msg.data,
                f"foreign: not a task of job {self.plan.job}: {scored.task_id}",
                subject=delivery.msg.subject,
                stream_seq=delivery.stream_seq,
                deliveries=delivery.deliveries,
            )
            await delivery.term()
            return False
        index, chunk = where
        self.out_now.discard(where)
        if index in self.done:
            await delivery.ack_sync()
            return False
        groups = self.held.setdefault(index, {})
        if chunk in groups and groups[chunk].stream_seq != delivery.stream_seq:
            await delivery.ack_sync()
            return False
        groups[chunk] = delivery
        if len(groups) < len(self.plan.chunks):
            return False
        problem = self.plan.problems[index]
        line = {**problem, "samples": sample_line([groups[c].message for c in sorted(groups)])}
        f.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self.done.add(index)
        for held in self.held.pop(index).values():
            await held.ack_sync()
        return True


async def collect(
    plan: Plan,
    done: set[int],
    config: BusConfig,
    window: int,
    progress: bool,
    *,
    embedded: bool = True,
    supervisor=None,
    fixed: bool = True,
) -> None:
    """Run the job on the bus `config` points at until every problem is written. `fixed`:
    on an external bus the tasks name the plan's model (else the actors' current weights)."""
    from protocol.bus import Bus
    from protocol.names import STREAM_DEAD, scored_stage
    from protocol.stage import StageConsumer
    from protocol.streams import delete_job_consumer, ensure_job_consumer, wait_for_streams

    bus = await Bus.connect(config, name=f"aha-generate-{plan.job}", setup=embedded)
    try:
        await wait_for_streams(bus.js)
        ack_wait_s = min(JOB_ACK_WAIT_S, config.scored.ack_wait_s)
        await ensure_job_consumer(bus.js, config, plan.job, ack_wait_s=ack_wait_s)
        consumer = StageConsumer(bus, scored_stage(plan.job))
        collector = Collector(plan, done, ack_wait_s=ack_wait_s)
        dead = DeadWatch(plan, (await bus.js.stream_info(STREAM_DEAD)).state.last_seq)
        model = plan.model if fixed and not embedded else None
        log.info(
            "generation job",
            job=plan.job,
            problems=len(plan.problems),
            left=len(plan.problems) - len(done),
            k=plan.k,
            tasks_per_problem=len(plan.chunks),
        )
        with open(plan.out, "a", encoding="utf-8") as f, _bar(progress, plan, done) as advance:
            while not collector.finished:
                await collector.top_up(bus, window, model)
                for delivery in await consumer.fetch(window, timeout=1.0):
                    if await collector.receive(bus, delivery, f):
                        advance()
                await collector.keep_held()
                await dead.check(bus, collector)
                _check_parts(supervisor)
        await consumer.close()
        await delete_job_consumer(bus.js, plan.job)
        log.info("generation job done", job=plan.job, out=str(plan.out))
    finally:
        await bus.close()


@dataclass
class DeadWatch:
    """Dead letters of the job's tasks published since it started: the job cannot finish."""

    plan: Plan
    after: int
    checked_at: float = 0.0

    async def check(self, bus, collector: Collector) -> None:
        from protocol.codec import peek_task_id

        if time.monotonic() - self.checked_at < 1.0:
            return
        self.checked_at = time.monotonic()
        for letter in await bus.dead_letters(after=self.after):
            self.after = letter.dead_seq
            tid = peek_task_id(letter.data)
            where = self.plan.position(tid) if tid else None
            if where is not None and where[0] not in collector.done:
                raise GenerateError(
                    f"task {tid} of job {self.plan.job} was dead-lettered at stage "
                    f"{letter.stage}: {letter.error}; {len(collector.done)} problems are "
                    f"written to {self.plan.out} (--resume continues)"
                )


def _check_parts(supervisor) -> None:
    if supervisor is None:
        return
    for exit in supervisor.poll():
        if not exit.restarted:
            raise GenerateError(
                f"{exit.name} exited with {exit.returncode} and is not restarted:\n{exit.log_tail}"
            )


@contextlib.contextmanager
def _bar(show: bool, plan: Plan, done: set[int]) -> Iterator:
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(f"generating ({plan.k} per problem)", total=len(plan.problems))
        bar.update(task, completed=len(done))
        yield lambda: bar.advance(task)


# -- the embedded bus -------------------------------------------------------------------------


@contextlib.contextmanager
def local_bus(
    plan: Plan, bus: BusConfig, actors: int, rewarders: int, engine: str | None
) -> Iterator[tuple[BusConfig, Any]]:
    """An embedded NATS server with `actors` actors serving `plan.model` and `rewarders`
    rewarders, each its own process (`deploy.supervisor`); all stopped on the way out."""
    import importlib.util

    import tomli_w

    from deploy.supervisor import Part, Supervisor
    from protocol.messages import payload_limit
    from protocol.server import NatsServer

    engine = engine or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    work = Path(tempfile.mkdtemp(prefix="aha-generate-"))
    limit = payload_limit(max(plan.chunks), plan.sampling.max_tokens)
    with NatsServer(work / "nats", max_payload=limit) as server:
        config = bus.model_copy(update={"url": server.url, "setup_streams": True})
        path = work / "aha.toml"
        sections = {
            "bus": json.loads(config.model_dump_json(exclude_none=True)),
            "actor": {"model": plan.model, "backend": engine},
            "rewarder": {},
        }
        path.write_text(tomli_w.dumps(sections))
        asyncio.run(_setup(config))
        supervisor = Supervisor(work / "logs")
        supervisor.watch_server(server)
        aha = [sys.executable, "-m", "deploy.cli"]
        env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        try:
            for i in range(actors):
                argv = [*aha, "actor", "--config", str(path), "--actor-id", f"gen-actor-{i}"]
                supervisor.start(Part(f"actor-{i}", argv, env, restart=True, stop_order=0))
            for i in range(rewarders):
                argv = [*aha, "rewarder", "--config", str(path)]
                supervisor.start(Part(f"rewarder-{i}", argv, env, restart=True, stop_order=1))
            log.info("embedded bus", url=server.url, engine=engine, logs=str(work / "logs"))
            yield config, supervisor
        except BaseException:
            log.error("generation stopped: the parts' logs are kept", logs=str(work / "logs"))
            raise
        else:
            shutil.rmtree(work / "logs", ignore_errors=True)
        finally:
            supervisor.stop(grace_s=10.0)
    shutil.rmtree(work, ignore_errors=True)


async def _setup(config: BusConfig) -> None:
    from protocol.bus import Bus

    bus = await Bus.connect(config, name="aha-generate-setup")
    await bus.close()


# -- the command ------------------------------------------------------------------------------


def parse_rewards(text: str) -> dict[str, float]:
    """`accuracy_math` or `accuracy_math=1,format_think=0.1` (weight 1 when left out)."""
    rewards = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        try:
            rewards[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--rewards: {name}'s weight {weight!r} is not a number") from None
    return rewards


def read_prompt_file(path: str | Path, prompt_field: str, answer_field: str) -> list[dict]:
    """`{id, prompt, reference}` per line of a JSONL prompt file (id: its `id` field, else
    the line number); `ConfigError` naming the file, line and field otherwise."""
    from protocol.config import read_jsonl

    rows = []
    for number, row in read_jsonl(path):
        for name in (prompt_field, answer_field):
            if name not in row:
                raise ConfigError(f"{name}: missing ({path}:{number})")
        if not isinstance(row[prompt_field], str):
            raise ConfigError(f"{prompt_field}: not a string ({path}:{number})")
        pid = row.get("id", number)
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ConfigError(f"id: {pid!r} is not a string or an integer ({path}:{number})")
        rows.append({"id": str(pid), "prompt": row[prompt_field], "reference": row[answer_field]})
    if not rows:
        raise ConfigError(f"no prompts in the file ({path})")
    return rows


def main(args) -> int:
    """The `aha generate` command."""
    from protocol.config import load_config
    from protocol.log import setup_logging

    setup_logging("generate")
    bus = load_config(BusConfig, None, section="bus")  # AHA_BUS__USER, … from the environment
    problems = read_prompt_file(args.prompts, args.prompt_field, args.answer_field)
    sampling = Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    out = generate(
        args.model,
        problems,
        k=args.k,
        sampling=sampling,
        rewards=parse_rewards(args.rewards),
        out=args.output,
        nats_url=args.nats_url,
        resume=args.resume,
        meta={"answer_tag": True} if args.answer_tag else None,
        job=args.job,
        window=args.window,
        actors=args.actors,
        rewarders=args.rewarders,
        engine=args.engine,
        bus=bus,
        progress=sys.stderr.isatty(),
    )
    print(f"{len(problems)} problems × {args.k} samples -> {out}", file=sys.stderr)
    return 0
