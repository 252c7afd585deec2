"""`aha learner` starting its own ranks (gloo, CPU) against a real nats-server.

- `learner.ranks = 2`: the command starts both ranks itself; rank 0 does the bus work and
  hands rank 1 every batch; SIGTERM stops both after a checkpoint.
- Two "nodes" (two `aha learner` processes, node ranks 0 and 1, one rank each, meeting on
  127.0.0.1; ZeRO-3, stopped after step 1 and resumed from their checkpoint) train the same
  batches to the same loss and weights as one rank running straight through.
- A rank killed mid-run stops the whole learner (exit 1, one line naming it); restarted, it
  trains every scored group exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import zlib

import numpy as np
import psutil
import pytest

from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import Rollout, Score, ScoredRollout, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, SCORED, TASKS
from protocol.server import NatsServer
from protocol.stage import StageConsumer

from .test_learner_loop import (
    DIST_ENV,
    free_port,
    learner_bus,
    learner_config,
    left_in_stream,
    play_actor_and_rewarder,
    read_lines,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TIMEOUT_S = 300


def write_config(tmp_path, model_dir, url, zero_stage=2, **overrides):
    from learner.config import DeepSpeedConfig, OptimConfig

    config = learner_config(
        tmp_path,
        model_dir,
        url,
        deepspeed=DeepSpeedConfig(zero_stage=zero_stage, precision="fp32", micro_batch=2),
        # Adam's ε well above fp32 rounding: the key biases' gradient is exactly 0 in exact
        # arithmetic (softmax ignores a shift), so theirs is rounding noise, which with
        # ε = 1e-8 becomes a step of ±lr whose sign depends on the order of the sums.
        optim=OptimConfig(lr=1e-3, eps=1e-4),
        **overrides,
    )
    path = tmp_path / "aha.yaml"  # JSON is YAML
    path.write_text(json.dumps({"learner": config.model_dump(mode="json")}))
    return config, path


async def start_learner(config_path, *flags, **env_extra):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("AHA_FAULT", "TORCHELASTIC_RUN_ID", *DIST_ENV):  # as a user's shell has them
        env.pop(key, None)
    env.update(env_extra)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deploy.cli",
        "learner",
        "--config",
        str(config_path),
        *flags,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def finish(proc) -> tuple[int, str]:
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=TIMEOUT_S)
    return proc.returncode, output.decode(errors="replace")


async def play_fixed_actor(bus, model_dir, stop: asyncio.Event) -> None:
    """Sample every task one at a time with the initial weights and a seed from its prompt,
    so two runs get the same groups in the same order whatever their timing; score the
    completions of a group 0, 1, 0, 1, ..."""
    from actors.hf_engine import HfEngine

    engine = HfEngine(model_dir)  # never loads a published version: staleness stays <= 1 here
    tasks = StageConsumer(bus, TASKS)
    while not stop.is_set():
        deliveries = await tasks.fetch(1, timeout=0.5)
        for delivery in deliveries:
            task = delivery.message
            seed = zlib.crc32(np.asarray(task.prompt_token_ids, dtype=np.int64).tobytes())
            sampling = task.sampling.model_copy(update={"seed": seed})
            (generation,) = await engine.generate_batch(
                [task.prompt_token_ids], sampling, task.group_size
            )
            rollout = Rollout(
                task=task,
                policy_version=generation.policy_version,
                actor_id="fixed",
                prompt_token_ids=task.prompt_token_ids,
                samples=generation.samples,
            )
            # rewards that differ within every group (the tiny model earns none of its own)
            scores = [Score(reward=float(i % 2)) for i in range(len(generation.samples))]
            await bus.publish(SCORED, ScoredRollout(rollout=rollout, scores=scores))
            await delivery.ack()
    await tasks.close()


async def train_with_fixed_actor(
    workdir, model_dir, node_ranks: list[int], runs: list[tuple[str, ...]]
) -> list[dict]:
    """Learner runs (ZeRO-3, sharing one nats-server and checkpoint folder) of
    `len(node_ranks)` nodes of one rank each, one per flags in `runs`; returns the metrics lines."""
    workdir.mkdir()
    with NatsServer(workdir / "nats") as server:
        nodes = (
            {"nodes": 2, "rendezvous": f"127.0.0.1:{free_port()}"} if len(node_ranks) > 1 else {}
        )
        _, config_path = write_config(
            workdir, model_dir, server.url, zero_stage=3, max_steps=2, ranks=1, **nodes
        )
        bus = await Bus.connect(learner_bus(server.url), name="test")
        stop = asyncio.Event()
        actor = asyncio.create_task(play_fixed_actor(bus, model_dir, stop))
        try:
            for flags in runs:
                procs = [
                    await start_learner(config_path, *flags, AHA_LEARNER__NODE_RANK=str(n))
                    for n in node_ranks
                ]
                for code, output in await asyncio.gather(*(finish(p) for p in procs)):
                    assert code == 0, output[-3000:]
        finally:
            stop.set()
            await actor
            await bus.close()
    return read_lines(workdir / "metrics.jsonl")


async def test_two_nodes_train_and_resume_like_one_rank(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    # two nodes: step 1, stop, then resume from the ZeRO-3 checkpoint both wrote for step 2
    two = await train_with_fixed_actor(
        tmp_path / "two", tiny_model_dir, [0, 1], [("--max-steps", "1"), ("--resume",)]
    )
    one = await train_with_fixed_actor(tmp_path / "one", tiny_model_dir, [0], [()])
    steps_two = [r for r in two if r["event"] == "step"]
    steps_one = [r for r in one if r["event"] == "step"]
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == [1, 2]
    for key in ("reward", "response_length"):  # the same batches
        assert [r[key] for r in steps_two] == [r[key] for r in steps_one], key
    # fp32 sums over two ranks in another order: equal to ~1e-6 relative
    for a, b in zip(steps_two, steps_one, strict=True):
        assert a["loss"] != 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    weights_two, weights_one = (
        {
            k: v
            for f in sorted((tmp_path / run / "final").glob("*.safetensors"))
            for k, v in load_file(f).items()
        }
        for run in ("two", "one")
    )
    assert weights_two.keys() == weights_one.keys()
    initial = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert any(not torch.equal(w, initial[n]) for n, w in weights_one.items() if n in initial)
    for name, w in weights_two.items():
        torch.testing.assert_close(
            w, weights_one[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def rank_process(launcher_pid: int, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


async def wait_for_steps(metrics, n: int) -> None:
    """Until the metrics file has `n` step lines (each written after its checkpoint)."""
    for _ in range(int(TIMEOUT_S / 0.1)):
        if metrics.exists() and sum(r["event"] == "step" for r in read_lines(metrics)) >= n:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no step {n} in {metrics}")


async def test_two_rank_learner_stops_on_sigterm_or_a_dead_rank_and_resumes_exactly_once(
    nats_server, bus, tmp_path, tiny_model_dir
):
    """`learner.ranks = 2`, started by `aha learner` itself: SIGTERM to the command stops
    both ranks after rank 0's checkpoint (exit 0); a rank killed mid-run stops the whole
    learner (exit 1, one line naming it); each restart resumes, and in the end every scored
    group was trained exactly once."""
    config, config_path = write_config(
        tmp_path, tiny_model_dir, nats_server.url, max_steps=6, ranks=2, stop_timeout_s=10
    )
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played)
    )
    metrics = tmp_path / "metrics.jsonl"
    try:
        proc = await start_learner(config_path)
        await wait_for_steps(metrics, 1)
        ranks = [rank_process(proc.pid, r) for r in (0, 1)]
        proc.send_signal(signal.SIGTERM)  # as Kubernetes stops the pod: to the launcher only
        code, output = await finish(proc)
        assert code == 0, output[-3000:]
        assert "starting learner ranks" in output and '"world_size": 2' in output, output[-3000:]
        assert "following rank 0" in output  # rank 1 ran, and took its orders from rank 0
        assert '"event": "learner stopped"' in output  # rank 0's own stop: checkpoint, hand back
        assert "learner ranks stopped" in output and "failed" not in output, output[-3000:]
        for rank in ranks:
            assert rank is not None and not rank.is_running()

        done = sum(r["event"] == "step" for r in read_lines(metrics))
        proc = await start_learner(config_path, "--resume")
        await wait_for_steps(metrics, done + 1)
        follower = rank_process(proc.pid, 1)
        assert follower is not None
        follower.send_signal(signal.SIGKILL)
        code, output = await finish(proc)
        assert code == 1, output[-3000:]
        assert "learner rank 1 failed (killed by SIGKILL)" in output, output[-3000:]

        code, output = await finish(await start_learner(config_path, "--resume"))
        assert code == 0, output[-3000:]
    finally:
        stop.set()
        await actor

    lines = read_lines(metrics)
    steps = [r for r in lines if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    trained = [t for r in steps for t in r["task_ids"]]
    dropped = [t for r in steps for t in r["task_ids_dropped"]]
    assert len(trained) == 6 * config.batch
    assert len(set(trained)) == len(trained), "a group was trained twice"
    scored = {task_id for task_id, _, _ in played}
    left = await left_in_stream(bus)
    assert scored == set(trained) | set(dropped) | set(left), "a scored group was lost"
    kv = await bus.js.key_value(KV_POLICY)
    assert decode((await kv.get(KEY_LATEST)).value, WeightManifest).version == 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(lines[-1]["final_model"])
