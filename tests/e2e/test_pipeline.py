"""`aha pipeline` killed in a middle stage and resumed: only that stage (and the ones after it,
which never ran) run again; the stage before it is skipped, its output untouched.

Three cheap stages: rejection sampling of a hand-made samples file, `aha sft` of the tiny
model on the kept pairs (a real DeepSpeed process: the stage that is killed), and a held-out
evaluation of the fine-tuned model.

And the demo recipe on a smaller budget, which must show the direction of R1's three findings
on held-out pass@1 (slow: tens of minutes on a loaded 2-core machine).
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

import pytest

REPO = Path(__file__).resolve().parents[2]
GOOD = "<think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>"
WRONG = "<think></think><answer>578</answer>"


def write_inputs(folder: Path) -> Path:
    from pipeline.tiny_model import TinySpec, save_tiny_model

    save_tiny_model(folder / "tiny", TinySpec())
    right = {"accuracy_gsm8k": 1.0, "format_think": 1.0}
    wrong = {"accuracy_gsm8k": 0.0, "format_think": 0.0}
    lines = [
        {
            "id": str(i),
            "prompt": "Q:123+456=",
            "reference": "579",
            "samples": [
                {"text": GOOD, "reward": 1.1, "components": right},
                {"text": WRONG, "reward": 0.0, "components": wrong},
            ],
        }
        for i in range(4)
    ]
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    held_out = [{"prompt": f"Q:00{i}+001=", "answer": str(i + 1)} for i in range(5)]
    (folder / "held_out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in held_out))
    recipe = folder / "r.toml"
    recipe.write_text(
        textwrap.dedent(
            """
            [pipeline]
            name = "killed"

            [[stages]]
            name = "rs"
            kind = "rs"
            samples = "samples.jsonl"

            [[stages]]
            name = "sft"
            kind = "sft"
            model = "tiny"
            data = ["@rs"]
            steps = 2
            batch = 4

            [[stages]]
            name = "eval"
            kind = "eval"
            models = { sft = "@sft" }
            held_out = "held_out.jsonl"
            k = 0
            """
        )
    )
    return recipe


def pipeline(folder: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "pipeline", "r.toml", "--json", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_run_killed_in_a_middle_stage_resumes_there(tmp_path):
    recipe = write_inputs(tmp_path)
    assert recipe.exists()
    run_dir = tmp_path / "runs" / "killed"
    sft_record = run_dir / "stages" / "sft.json"
    first = pipeline(tmp_path)

    def sft_started() -> bool:
        try:
            running = json.loads(sft_record.read_text())["status"] == "running"
        except (OSError, ValueError):
            return False
        return running and bool(children_of(first.pid))

    wait_for(sft_started, 60, "the sft stage to start")
    sft_process = children_of(first.pid)[0]
    os.kill(first.pid, signal.SIGKILL)  # the pipeline only: its stage must not outlive it
    first.wait()
    wait_for(lambda: not alive(sft_process), 10, "the orphaned sft process to die")
    rs_record = json.loads((run_dir / "stages" / "rs.json").read_text())
    assert rs_record["status"] == "done"
    assert json.loads(sft_record.read_text())["status"] == "running"
    assert not (run_dir / "eval").exists()
    rs_output = (run_dir / "rs" / "rs.jsonl").stat().st_mtime_ns

    second = pipeline(tmp_path, "--resume")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["rs"]["skipped"] and by_name["rs"]["attempts"] == 1
    assert not by_name["sft"]["skipped"] and by_name["sft"]["attempts"] == 2
    assert not by_name["eval"]["skipped"] and by_name["eval"]["attempts"] == 1
    assert (run_dir / "rs" / "rs.jsonl").stat().st_mtime_ns == rs_output
    assert (run_dir / "sft" / "model" / "config.json").is_file()
    assert set(summary["findings"]) == {"sft"}
    assert 0 <= summary["findings"]["sft"]["accuracy"] <= 1
    assert Path(summary["plot"]).is_file()


def test_bus_sampled_stages_share_one_server_actor_and_rewarder(tmp_path):
    from pipeline.tiny_model import TinySpec, save_tiny_model

    save_tiny_model(tmp_path / "a", TinySpec(seed=1))
    save_tiny_model(tmp_path / "b", TinySpec(seed=2))
    prompts = [{"prompt": f"Q:00{i}+001=", "answer": str(i + 1)} for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    everything = '["truncated", "undecided", "incorrect", "malformed", "duplicate"]'
    stage = 'kind = "rs"\nprompts = "prompts.jsonl"\nmax_tokens = 8\n'
    stage += f"filters = {{ skip = {everything}, max_per_prompt = 8 }}\n"
    (tmp_path / "r.toml").write_text(
        '[pipeline]\nname = "bus"\nengine = "hf"\n'
        f'[[stages]]\nname = "from-a"\nmodel = "a"\nk = 2\n{stage}'
        f'[[stages]]\nname = "from-b"\nmodel = "b"\nk = 3\n{stage}'
    )
    run = pipeline(tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    # Every sample of every problem came back once: 3 x 2, then 3 x 3.
    assert [s["result"]["samples"] for s in summary["stages"]] == [6, 9]
    logs = tmp_path / "runs" / "bus" / "bus" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["actor-0.log", "rewarder-0.log"]
    lines = (logs / "actor-0.log").read_text().splitlines()
    actor = [json.loads(line) for line in lines if line.startswith("{")]  # not transformers'
    assert sum(line.get("event") == "actor ready" for line in actor) == 1  # never restarted
    switches = [line for line in actor if line.get("event") == "switching model"]
    assert [(s["was"], s["serving"]) for s in switches] == [
        (str(tmp_path / "a"), str(tmp_path / "b"))
    ]


def fast_demo(folder: Path) -> Path:
    """The demo recipe on a smaller budget: 15 GRPO steps, the distillation from that first RL
    model (no second GRPO), a shorter student, its RL control 5 steps, 200 held-out problems.
    The cold start and the SFTs on RS data keep their steps and the 2,000 prompts: with 500
    prompts and 600 steps the filtered SFT (700 pairs) fit worse than the unfiltered one (1,250)
    and scored below it (pass@1 0.13 vs 0.18, measured)."""
    import tomllib

    import tomli_w

    from pipeline.recipe import demo_recipe

    recipe = tomllib.loads(demo_recipe().read_text())
    recipe["pipeline"] |= {"name": "fast"}
    recipe["pipeline"]["demo"] |= {"held_out": 200}
    steps = {"distill": 600, "student-cold-start": 300}
    stages = []
    for stage in recipe["stages"]:
        if stage["name"] == "rl-2":
            continue
        if stage["name"] in steps:
            stage |= {"steps": steps[stage["name"]], "lr": 3e-3}
        if stage["kind"] == "grpo":
            stage |= {"max_steps": 15 if stage["name"] == "rl" else 5}
            stage["up"] = {"eval_problems": 20, "eval_samples": 0}
        if stage["name"] == "distill":
            stage["teacher"] = "@rl"
        if stage["name"] == "eval-students":
            del stage["models"]["rl_after_sft"]
        stages.append(stage)
    path = folder / "r.toml"
    path.write_text(tomli_w.dumps({**recipe, "stages": stages}))
    return path


@pytest.mark.slow
@pytest.mark.demo
def test_the_fast_demo_shows_the_direction_of_r1s_three_findings(tmp_path):
    fast_demo(tmp_path)
    run = pipeline(tmp_path)
    out, err = run.communicate(timeout=2400)
    assert run.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["wall_seconds"] > 0 and Path(summary["plot"]).is_file()
    assert [s["kind"] for s in summary["stages"]][:3] == ["sft", "grpo", "eval"]
    found = summary["findings"]
    p = {label: found[label]["pass_at_1"] for label in FINDING_LABELS}
    greedy = {label: found[label]["accuracy"] for label in FINDING_LABELS}
    print("pass@1", p, "greedy", greedy, "seconds", summary["wall_seconds"])
    cold, rl = found["cold_start"], found["rl"]
    # 1. RL improves reasoning: pass@1 up, and the model thinks more and longer.
    assert p["rl"] > p["cold_start"]
    assert rl["mean_length"] > cold["mean_length"]
    assert rl["thinking_share"] > cold["thinking_share"]
    # 2. SFT of the base on filtered RS data beats SFT on the same samples unfiltered.
    assert p["sft_rs"] > p["sft_unfiltered"]
    # 3. The distilled student beats the same student trained by RL alone.
    assert p["distilled"] > p["student_rl"]


FINDING_LABELS = ("cold_start", "rl", "sft_rs", "sft_unfiltered", "distilled", "student_rl")
