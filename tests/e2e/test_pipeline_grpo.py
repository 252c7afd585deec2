"""`aha pipeline`'s grpo stages on the pipeline's one NATS server, actor and rewarder.

Two GRPO stages of a few steps each (tiny models, HF engine): the demo model, then a student
of another architecture (width 32, one head) whose learner counts its versions from 0 again.
Each stage starts only its learner (`aha up` with no actors or rewarders of its own); the one
actor takes each learner's policy with its first task, restarting its engine for the student.
The pipeline is SIGKILLed in the student's stage after its first step and resumed: the first
stage is skipped, the student's learner continues from its checkpoint on the same bus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEARNER = (
    "{ batch = 2, dataset = { group_size = 2, max_tokens = 16 }, deepspeed = { micro_batch = 4 } }"
)
UP = "{ eval_problems = 4, eval_samples = 0 }"


def write_inputs(folder: Path) -> None:
    from pipeline.tiny_model import TinySpec, save_tiny_model

    save_tiny_model(folder / "tiny", TinySpec())
    student = TinySpec(hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=96)
    save_tiny_model(folder / "student", student)
    stages = "".join(
        f"""
        [[stages]]
        name = "{name}"
        kind = "grpo"
        model = "{model}"
        max_steps = {steps}
        up = {UP}
        parts = {{ learner = {LEARNER} }}
        """
        for name, model, steps in (("rl", "tiny", 2), ("student-rl", "student", 3))
    )
    text = '[pipeline]\nname = "g"\nengine = "hf"\n' + textwrap.dedent(stages)
    (folder / "r.toml").write_text(text)


def pipeline(folder: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AHA_") and k != "NATS_URL"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "deploy.cli", "pipeline", "r.toml", "--json", *args]
    return subprocess.Popen(
        argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def steps_of(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in lines if r.get("event") == "step"]


def actor_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "bus" / "logs" / "actor-0.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]  # not transformers'


def test_grpo_stages_run_on_the_pipelines_one_bus_and_resume_there(tmp_path):
    write_inputs(tmp_path)
    run_dir = tmp_path / "runs" / "g"
    first = pipeline(tmp_path)
    deadline = time.monotonic() + 400
    while not steps_of(run_dir / "student-rl" / "metrics.jsonl"):
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "timed out waiting for the student's first step"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # its stage, server, actor and rewarder die with it
    first.wait()
    before_kill = steps_of(run_dir / "student-rl" / "metrics.jsonl")

    second = pipeline(tmp_path, "--resume")
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["rl"]["skipped"] and by_name["rl"]["result"]["steps"] == 2
    assert not by_name["student-rl"]["skipped"] and by_name["student-rl"]["attempts"] == 2
    assert by_name["student-rl"]["result"]["steps"] == 3
    # the steps committed before the kill were not trained again
    steps = steps_of(run_dir / "student-rl" / "metrics.jsonl")
    assert steps[: len(before_kill)] == before_kill and sorted(set(steps)) == [1, 2, 3]
    assert all(steps.count(step) == 1 for step in before_kill)

    for stage in ("rl", "student-rl"):
        folder = run_dir / stage
        assert (folder / "final" / "config.json").is_file()
        # only the learner: no server, actor or rewarder of its own
        assert sorted(p.name for p in (folder / "logs").iterdir()) == ["learner.log"]
        assert not (folder / "nats").exists()
        result = json.loads((folder / "summary.json").read_text())
        assert result["groups_foreign"] == 0 and result["groups_dead"] == 0
        assert result["accuracy_before"] is not None and result["accuracy_after"] is not None
    assert sorted(p.name for p in (run_dir / "bus" / "logs").iterdir()) == [
        "actor-0.log",
        "rewarder-0.log",
    ]
    events = actor_events(run_dir)
    # one actor per pipeline process (the kill ended the first): the first took rl's policy,
    # then the student's (the second found the student's published and loaded it at start),
    # and restarted its engine only for the student
    assert sum(e.get("event") == "actor ready" for e in events) == 2
    taken = [e["policy"] for e in events if e.get("event") == "taking a learner's policy"]
    assert taken[0] != taken[1] and set(taken) == {taken[0], taken[1]}
    switches = [(e["was"], e["serving"]) for e in events if e.get("event") == "switching model"]
    assert switches == [(str(tmp_path / "tiny"), str(tmp_path / "student"))]
