"""Verification in worker processes, each call under a hard timeout.

Verifiers must never hang the rewarder and never lie. Math-Verify times out with
`signal.alarm`, which only works in a process's main thread (Math-Verify#55; verl once
scored all of MATH 0 because of it), and sympy or a sandboxed program can take any time. So
every completion is scored in the main thread of a worker process, and the parent holds a
deadline per call: a worker past it is SIGKILLed (its sandbox dies with it, see
`rewarder.sandbox`) and replaced. A completion whose verifier raised, timed out or crashed
gets `Score(reward=None, error=<why>)`, and the pool counts it.

Workers start through `forkserver` (never forked from a parent that may run threads: the
event loop's executor, NATS client threads); the server preloads the reward modules once, so
a replacement worker starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from protocol.messages import Score
from rewarder.sandbox import SandboxConfig

PRELOAD = ["rewarder._preload", "protocol.messages"]
"""Modules the forkserver imports once, so that workers start warm (see `_preload`)."""


@dataclass(frozen=True)
class Job:
    """One completion to score."""

    completion: str
    reference: Any
    rewards: dict[str, float]
    """Reward name -> weight, as in `Task.rewards`."""
    task: Any = None
    """The `protocol.messages.Task`, or None for offline scoring."""


@dataclass
class PoolStats:
    """What the pool has done since it started (the rewarder's metrics read these)."""

    scored: int = 0
    """Completions with a reward."""
    errors: int = 0
    """Completions whose verifier raised (`VerifierError` or a bug)."""
    timeouts: int = 0
    """Calls killed at the per-call timeout."""
    crashes: int = 0
    """Workers that died by themselves during a call."""
    restarts: int = 0
    """Workers started to replace a killed or crashed one."""
    by_error: dict[str, int] = field(default_factory=dict)
    """Failed completions per reward name (`timeout` / `crash` for whole calls)."""
    disqualified: int = 0
    """Completions with a component that is 0 by a rule (`Disqualified`), e.g. one that
    stalled its verifier: scored, with the reason in `VerifierPool.notes`."""


def _serve(
    conn: Connection, sandbox: SandboxConfig, timeout_s: float, plugins: tuple[str, ...] = ()
) -> None:
    """A worker: score jobs from `conn` in this process's main thread until told to stop."""
    from rewarder.code import fit_code_budget
    from rewarder.rewards import configure_sandbox, fit_answer_budget, grade, load_plugins

    load_plugins(list(plugins))  # the rewarder loaded them once already: they import

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    configure_sandbox(sandbox)
    fit_answer_budget(timeout_s)  # a completion that stalls Math-Verify: 0 before the timeout
    fit_code_budget(timeout_s)  # likewise a program that hangs on every test case
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        key, job = item
        conn.send((key, tuple(grade(job.completion, job.reference, job.rewards, job.task))))


class _Worker:
    def __init__(self, ctx, sandbox: SandboxConfig, timeout_s: float, plugins: tuple[str, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, sandbox, timeout_s, plugins), daemon=True
        )
        self.process.start()
        child.close()
        self.key: int | None = None
        self.job: Job | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class VerifierPool:
    """`workers` processes scoring `Job`s, each call killed after `timeout_s`.

    Worker i runs sandboxed programs as uid `sandbox.uid - i` (their checkers as
    `sandbox.checker_uid - i`): RLIMIT_NPROC counts per uid, so a fork bomb in one worker's
    sandbox cannot starve another's. Use one pool from one
    thread at a time (`score_async` runs it in a thread for asyncio callers).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 30.0,
        sandbox: SandboxConfig = SandboxConfig(),
        start_method: str = "forkserver",
        plugins: Sequence[str] = (),
    ):
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.timeout_s = timeout_s
        self.plugins = tuple(plugins)
        """Plug-in rewards (`module:function`) every worker imports at start."""
        self.stats = PoolStats()
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(PRELOAD)
        if (
            sandbox.checker_uid - workers < sandbox.uid
            and sandbox.uid - workers < sandbox.checker_uid
        ):
            raise ValueError(
                f"sandbox uids {sandbox.uid} and checker_uid {sandbox.checker_uid} are fewer"
                f" than {workers} (workers) apart: workers would share a uid"
            )
        self._sandboxes = [
            sandbox.model_copy(
                update={"uid": sandbox.uid - i, "checker_uid": sandbox.checker_uid - i}
            )
            for i in range(workers)
        ]
        self._workers = [_Worker(self._ctx, s, timeout_s, self.plugins) for s in self._sandboxes]
        self._lock = threading.Lock()
        self.notes: dict[int, str] = {}
        """Why a component is 0 by a rule, by job index, for the jobs of the current (or last)
        `scores` call; `Score` has no field for it on the wire."""

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (for CPU accounting)."""
        return [w.process.pid for w in self._workers]

    def scores(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Score]]:
        """Yield `(index, Score)` for every job as it finishes (not in order)."""
        with self._lock:
            self.notes = {}
            pending = deque(enumerate(jobs))
            busy: dict[int, _Worker] = {}  # key -> worker
            self._crashed: set[int] = set()  # keys whose first try killed its worker
            try:
                yield from self._run(pending, busy)
            finally:
                # abandoned half-way: a late answer must not reach the next call
                for worker in busy.values():
                    self._replace(self._workers.index(worker))

    def _run(self, pending: deque, busy: dict[int, _Worker]) -> Iterator[tuple[int, Score]]:
        while pending or busy:
            for slot, worker in enumerate(self._workers):
                if worker.key is None and pending:
                    key, job = pending.popleft()
                    try:
                        worker.conn.send((key, job))
                    except (BrokenPipeError, OSError):
                        worker = self._replace(slot)
                        worker.conn.send((key, job))
                    worker.key, worker.job = key, job
                    worker.deadline = time.monotonic() + self.timeout_s
                    busy[key] = worker
            timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            ready = wait([w.conn for w in busy.values()], timeout=timeout)
            for worker in list(busy.values()):
                if worker.conn in ready:
                    scored = self._collect(worker, busy, pending)
                    if scored is not None:
                        yield scored
                elif time.monotonic() >= worker.deadline:
                    yield self._expire(worker, busy)

    def map(
        self, jobs: Sequence[Job], on_score: Callable[[int, Score], None] | None = None
    ) -> list[Score]:
        """Scores of `jobs`, in order; `on_score(index, score)` is called as each finishes."""
        out: list[Score | None] = [None] * len(jobs)
        for i, score in self.scores(jobs):
            out[i] = score
            if on_score is not None:
                on_score(i, score)
        return out  # type: ignore[return-value]

    async def score_async(self, jobs: Sequence[Job]) -> list[Score]:
        """`map` off the event loop."""
        return await asyncio.to_thread(self.map, jobs)

    def _collect(
        self, worker: _Worker, busy: dict[int, _Worker], pending: deque
    ) -> tuple[int, Score] | None:
        key, job = worker.key, worker.job
        assert key is not None and job is not None
        del busy[key]
        worker.key = worker.job = None
        try:
            _, (reward, components, error, note) = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=1)
            code = worker.process.exitcode
            self.stats.crashes += 1
            self._count_failure("crash")
            self._replace(self._workers.index(worker))
            return self._crashed_once_or_twice(key, job, code, pending)
        if error is None:
            self.stats.scored += 1
        else:
            self.stats.errors += 1
            for name, value in components.items():
                if value is None:
                    self._count_failure(name)
        if note is not None:
            self.stats.disqualified += 1
            self.notes[key] = note
        return key, Score.of(reward, components, error, note)  # NaN from a verifier: no reward

    def _crashed_once_or_twice(
        self, key: int, job: Job, code: int | None, pending: deque
    ) -> tuple[int, Score] | None:
        """A crash may be the machine's (memory) or the completion's (an answer that kills the
        parser): the job is scored once more on a fresh worker, and a second crash is the
        completion's 0 with the reason. "No reward" would leave it out of the advantage, so a
        policy could learn to crash the verifier to escape its zeros."""
        if key not in self._crashed:
            self._crashed.add(key)
            pending.appendleft((key, job))
            return None
        self.stats.disqualified += 1
        self.notes[key] = note = f"the completion killed its verifier twice (exit code {code})"
        return key, Score(reward=0.0, components={name: 0.0 for name in job.rewards}, note=note)

    def _expire(self, worker: _Worker, busy: dict[int, _Worker]) -> tuple[int, Score]:
        key = worker.key
        assert key is not None
        del busy[key]
        self.stats.timeouts += 1
        self._count_failure("timeout")
        self._replace(self._workers.index(worker))
        return key, Score(
            reward=None, error=f"timeout: verifier still running after {self.timeout_s:g}s"
        )

    def _count_failure(self, name: str) -> None:
        self.stats.by_error[name] = self.stats.by_error.get(name, 0) + 1

    def _replace(self, slot: int) -> _Worker:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(
            self._ctx, self._sandboxes[slot], self.timeout_s, self.plugins
        )
        self.stats.restarts += 1
        return self._workers[slot]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
