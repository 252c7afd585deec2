"""`aha eval --model`'s sampling flags reach the actors: the Tasks it publishes on a real bus,
read back through the actors' own consumer, carry the temperature, top-p, max tokens and
seed given on the command line (`--greedy`: one sample at temperature 0).

No actor runs: the test is the actor, so it sees exactly what one would receive. The values
are none of the defaults (0.6 / 0.95 / 32768 / seed 0), so a path that dropped any of them
would fail here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.benchmarks import get_benchmark
from protocol.messages import Sampling, Task
from protocol.names import TASKS
from protocol.stage import StageConsumer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AHA = [sys.executable, "-m", "deploy.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PROBLEMS = 2
"""`--limit`: the first two GSM8K problems."""


def derived_seed(seed: int, problem_id: str, chunk: int = 0) -> int:
    """The seed of one task: `--seed` mixed with the problem and chunk (each task its own,
    so the chunks of one problem differ): the first 8 hex digits of sha256("seed|id|chunk")."""
    return int(hashlib.sha256(f"{seed}|{problem_id}|{chunk}".encode()).hexdigest()[:8], 16)


async def published_tasks(bus, argv: list[str], count: int) -> list[Task]:
    """Run `aha eval` with `argv` against the test's bus and read `count` tasks from the
    actors' consumer (acked, as an actor would), then stop the command."""
    consumer = StageConsumer(bus, TASKS)
    proc = subprocess.Popen(
        [*AHA, "eval", *argv, "--nats-url", bus.config.url],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tasks: list[Task] = []
    try:
        deadline = time.monotonic() + 120
        while len(tasks) < count:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{len(tasks)} of {count} tasks in 120 s"
            for delivery in await consumer.fetch(count, timeout=1.0):
                tasks.append(delivery.message)
                await delivery.ack()
        await asyncio.sleep(0.5)  # nothing more than asked for is published
        assert await consumer.fetch(count, timeout=0.5) == []
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        await consumer.close()
    return sorted(tasks, key=lambda t: t.prompt_id)


def eval_argv(model: Path, out: Path, *flags: str) -> list[str]:
    base = ["--model", str(model), "--bench", "gsm8k", "--limit", str(PROBLEMS)]
    return [*base, "-o", str(out), *flags]


def expected_prompts() -> list[tuple[str, str]]:
    bench = get_benchmark("gsm8k")
    return [(p.id, bench.prompt(p)) for p in bench.problems()[:PROBLEMS]]


async def test_eval_model_sampling_flags_are_the_tasks_sampling(bus, tmp_path, tiny_model_dir):
    flags = ["--k", "3", "--temperature", "0.35", "--top-p", "0.8"]
    flags += ["--max-tokens", "7", "--seed", "11"]
    argv = eval_argv(tiny_model_dir, tmp_path / "out", *flags)
    tasks = await published_tasks(bus, argv, PROBLEMS)

    for task, (pid, prompt) in zip(tasks, expected_prompts(), strict=True):
        assert (task.prompt_id, task.prompt) == (pid, prompt)
        assert task.group_size == 3  # --k: one task of 3 samples per problem
        assert task.model == str(tiny_model_dir.resolve())  # the model folder, not the policy
        assert task.rewards == {"accuracy_gsm8k": 1.0}
        assert task.sampling == Sampling(
            temperature=0.35, top_p=0.8, max_tokens=7, seed=derived_seed(11, pid)
        )


async def test_eval_model_greedy_is_one_sample_at_temperature_0(bus, tmp_path, tiny_model_dir):
    argv = eval_argv(tiny_model_dir, tmp_path / "out", "--greedy", "--max-tokens", "9")
    tasks = await published_tasks(bus, argv, PROBLEMS)

    for task, (pid, _) in zip(tasks, expected_prompts(), strict=True):
        assert task.group_size == 1
        assert task.sampling == Sampling(
            temperature=0.0, top_p=1.0, max_tokens=9, seed=derived_seed(0, pid)
        )


async def test_eval_model_defaults_to_r1s_protocol(bus, tmp_path, tiny_model_dir):
    """No sampling flag: 64 samples per problem (4 tasks of 16) at temperature 0.6, top-p
    0.95, 32768 tokens (R1.md, "Evaluation")."""
    tasks = await published_tasks(bus, eval_argv(tiny_model_dir, tmp_path / "out"), 4 * PROBLEMS)

    by_problem = {pid: [t for t in tasks if t.prompt_id == pid] for pid, _ in expected_prompts()}
    for pid, chunks in by_problem.items():
        assert sorted(t.group_size for t in chunks) == [16] * 4
        assert sorted(t.sampling.seed for t in chunks) == sorted(
            derived_seed(0, pid, chunk) for chunk in range(4)
        )
        for task in chunks:
            assert task.sampling == Sampling(
                temperature=0.6, top_p=0.95, max_tokens=32768, seed=task.sampling.seed
            )
