"""`aha learner` under torchrun with two ranks (ZeRO-2, gloo): rank 0 does the bus work and
hands rank 1 every batch; both exit 0 at max_steps."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from protocol.codec import decode
from protocol.messages import WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY

from .test_learner_loop import DIST_ENV, learner_config, play_actor_and_rewarder, read_lines

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


async def test_two_ranks_train_the_batches_rank_0_collects(
    nats_server, bus, tmp_path, tiny_model_dir
):
    from learner.config import DeepSpeedSettings

    config = learner_config(
        tmp_path, tiny_model_dir, nats_server.url, max_steps=2,
        deepspeed=DeepSpeedSettings(zero_stage=2, precision="fp32", micro_batch=2),
    )  # fmt: skip
    config_path = tmp_path / "aha.yaml"
    config_path.write_text(json.dumps({"learner": config.model_dump(mode="json")}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("AHA_FAULT", *DIST_ENV):  # an in-process engine test may have set them
        env.pop(key, None)
    stop, played = asyncio.Event(), []
    actor = asyncio.create_task(
        play_actor_and_rewarder(bus, tiny_model_dir, tmp_path / "dl", stop, played)
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "deploy.cli", "learner", "--config", str(config_path), env=env,
        )  # fmt: skip
        assert await asyncio.wait_for(proc.wait(), timeout=300) == 0
    finally:
        stop.set()
        await actor
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines if r["event"] == "step"] == [1, 2]
    assert lines[-1]["event"] == "done" and lines[-1]["groups_trained"] == 4
    kv = await bus.js.key_value(KV_POLICY)
    assert decode((await kv.get(KEY_LATEST)).value, WeightManifest).version == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(lines[-1]["final_model"])
