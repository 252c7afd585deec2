"""Exactly once across a crash: `aha learner` killed (SIGKILL) between a step and its
checkpoint, or between the checkpoint and the acks, then restarted from the checkpoint.

The test plays actor and rewarder (real HF engine, real rewards). Afterwards every scored
group ever published was trained exactly once, dropped once, or is still in the stream —
none lost, none trained twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from .test_learner_loop import (
    DIST_ENV,
    learner_config,
    left_in_stream,
    play_actor_and_rewarder,
    read_lines,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


async def learner_process(
    config_path, *flags: str, fault: str | None = None, capture: bool = False
):
    """`aha learner` as a process: its exit status (and with `capture`, its output)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("AHA_FAULT", *DIST_ENV):  # an in-process engine test may have set them
        env.pop(key, None)
    if fault:
        env["AHA_FAULT"] = fault
    pipe = asyncio.subprocess.PIPE if capture else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deploy.cli",
        "learner",
        "--config",
        str(config_path),
        *flags,
        env=env,
        stdout=pipe,
        stderr=asyncio.subprocess.STDOUT if capture else None,
    )
    if not capture:
        return await asyncio.wait_for(proc.wait(), timeout=240)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    return proc.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("fault", ["crash_before_checkpoint:2", "crash_before_ack:2"])
async def test_killed_learner_trains_every_group_exactly_once(
    fault, nats_server, bus, tmp_path, tiny_model_dir
):
    config = learner_config(
        tmp_path, tiny_model_dir, nats_server.url, max_steps=4, final_model_dir=None
    )
    config_path = tmp_path / "aha.yaml"  # JSON is YAML
    config_path.write_text(json.dumps({"learner": config.model_dump(mode="json")}))
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played)
    )
    try:
        assert await learner_process(config_path, fault=fault) == -9  # SIGKILL-ed at the fault
        assert await learner_process(config_path, "--resume") == 0  # from the checkpoint
    finally:
        stop.set()
        await actor

    lines = read_lines(tmp_path / "metrics.jsonl")
    steps = [r for r in lines if r["event"] == "step"]
    # A step line is written after its checkpoint: lines are exactly the committed steps.
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    trained = [t for r in steps for t in r["task_ids"]]
    dropped = [t for r in steps for t in r["task_ids_dropped"]]
    assert len(trained) == 4 * config.batch
    assert len(set(trained)) == len(trained), "a group was trained twice"
    assert not set(trained) & set(dropped) and len(set(dropped)) == len(dropped)
    scored = {task_id for task_id, _, _ in played}
    left = await left_in_stream(bus)
    assert scored == set(trained) | set(dropped) | set(left), "a scored group was lost"
    if fault.startswith("crash_before_ack"):
        # Step 2's groups were checkpointed but never acked: they came back and were
        # recognised as consumed (acked untrained).
        assert steps[-1]["groups_duplicates"] >= 1
