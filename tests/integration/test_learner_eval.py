"""`[learner.eval]`: eval jobs during training through the same actor and rewarder processes.

The learner (DeepSpeed, in this process) trains 2 steps on the demo task with an eval of 2
GSM8K problems × 2 samples after each; a real `aha actor` (HF engine) and `aha rewarder` serve
both jobs. The learner's accounting is that of a run without evals, and each eval gets every
one of its groups, its line in metrics.jsonl tagged with its version: the actor sampled it with
that version saved as a model folder (loaded in place), then went back to training's policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import yaml

from learner.config import EvalConfig
from learner.outcomes import ISSUED
from tests.integration.test_learner_loop import learner_bus, learner_config, read_lines

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


async def test_eval_jobs_during_training_leave_the_learners_accounting_exact(
    nats_server, tmp_path, tiny_model_dir
):
    from learner.loop import run

    bus = learner_bus(nats_server.url)
    evals = EvalConfig(every_steps=1, benchmarks=["gsm8k"], k=2, limit=2, max_tokens=8)
    config = learner_config(tmp_path, tiny_model_dir, nats_server.url, max_steps=2, eval=evals)
    parts = tmp_path / "parts.yaml"
    sections = {
        "bus": json.loads(bus.model_dump_json(exclude_none=True)),
        "actor": {
            "model": str(tiny_model_dir),
            "backend": "hf",
            "concurrency": 2,
            "model_dirs": [str(tmp_path / "checkpoints" / "eval")],
        },
        "rewarder": {"workers": 1},
    }
    parts.write_text(yaml.safe_dump(sections))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", role, "--config", str(parts)],
            stdout=open(tmp_path / f"{role}.log", "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            env=env,
        )
        for role in ("actor", "rewarder")
    ]
    try:
        assert await asyncio.wait_for(run(config), timeout=400) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    lines = read_lines(tmp_path / "metrics.jsonl")
    steps = [r for r in lines if r["event"] == "step"]
    done = lines[-1]
    assert [r["step"] for r in steps] == [1, 2]
    # training's accounting: exactly as without evals, nothing foreign, nothing lost
    assert done["groups_trained"] == 4 and done["groups_foreign"] == 0
    consumed = sum(done[o.key] for o in ISSUED)
    assert done["tasks_issued"] == consumed + done["groups_in_flight_at_stop"]
    # one eval per version, every group of it: 2 problems × 2 samples, sampled with version v
    # saved as a folder (a fixed model: version 0 to the actor), removed once evaluated
    evals_done = sorted((r["version"], r) for r in lines if r["event"] == "eval")
    assert [v for v, _ in evals_done] == [1, 2]
    log_lines = (tmp_path / "actor.log").read_text().splitlines()
    actor = [json.loads(x) for x in log_lines if x.startswith("{")]
    served = {e["serving"] for e in actor if e.get("event") == "switching model"}
    for version, line in evals_done:
        assert (line["bench"], line["problems"], line["k"]) == ("gsm8k", 2, 2)
        folder = tmp_path / "checkpoints" / "eval" / f"v{version}"
        rows = read_lines(folder / "gsm8k.samples.jsonl")
        assert sorted(r["id"] for r in rows) == ["0", "1"]
        assert all(len(r["samples"]) == 2 for r in rows)
        assert {s["policy_version"] for r in rows for s in r["samples"]} == {0}
        assert str((folder / "model").resolve()) in served and not (folder / "model").exists()
    assert done["groups_dead"] == 0  # training's tasks were served between the evals


def test_an_unknown_benchmark_stops_the_learner_at_its_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"unknown \['nope'\]; known: gsm8k"):
        EvalConfig(benchmarks=["gsm8k", "nope"])
