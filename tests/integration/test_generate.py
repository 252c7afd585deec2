"""`aha generate` and `aha eval --model` as a job on a real bus: a real nats-server, an HF
actor process serving the tiny model and a rewarder process, as operators run them.

Small on purpose (a handful of problems, k of 2-3, 8 tokens): what is checked is that every
sample arrives exactly once, killed or not, and that the rewarders' scores summarise to what
the in-process reference (`pipeline.evaluation.evaluate`, scoring again) gives on the same
samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.benchmarks import get_benchmark
from pipeline.evaluation import evaluate, extract_answer
from pipeline.samples import read_samples
from protocol.config import BusConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AHA = [sys.executable, "-m", "deploy.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
JOB = {**ENV, "AHA_BUS__SCORED__ACK_WAIT_S": "3"}
"""`aha generate`'s environment: what a killed run held comes back within 3 s."""


class Parts:
    """`aha actor` (HF, allowed to serve the tiny model's folder) and `aha rewarder`
    processes on the test's server; a task an actor dies holding comes back after 3 s."""

    def __init__(self, tmp_path: Path, url: str, model: Path):
        self.tmp_path, self.url = tmp_path, url
        self.config = tmp_path / "parts.yaml"
        bus = BusConfig(url=url).model_dump(exclude_none=True)
        bus["tasks"]["ack_wait_s"] = 3.0
        sections = {
            "bus": bus,
            "actor": {"model": str(model), "backend": "hf", "concurrency": 2},
            "rewarder": {"workers": 1},
        }
        self.config.write_text(yaml.safe_dump(sections))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, name: str) -> None:
        with open(self.tmp_path / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                [*AHA, role, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ENV,
            )


@pytest.fixture
def parts(tmp_path, nats_server, tiny_model_dir):
    parts = Parts(tmp_path, nats_server.url, tiny_model_dir)
    parts.start("actor", "actor")
    parts.start("rewarder", "rewarder")
    yield parts
    for proc in parts.procs.values():
        proc.kill()
        proc.wait()


def first_line_then(generate: subprocess.Popen, out: Path) -> None:
    """Wait until `generate` has written its first line."""
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert generate.poll() is None, generate.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no line written in 120 s"
        time.sleep(0.05)


def write_prompts(path: Path, pairs) -> list[tuple[str, str]]:
    problems = [(f"Q:{a}+{b}=", str(a + b)) for a, b in pairs]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in problems))
    return problems


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_eval_through_the_bus_summarises_exactly_as_the_in_process_reference(
    tmp_path, parts, tiny_model_dir
):
    out = tmp_path / "eval"
    argv = [*AHA, "eval", "--model", str(tiny_model_dir), "--bench", "gsm8k", "--limit", "3"]
    argv += ["--k", "2", "--max-tokens", "8", "--nats-url", parts.url, "-o", str(out), "--json"]
    done = subprocess.run([*argv, "--workers", "1"], env=ENV, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    printed = json.loads(done.stdout.decode().splitlines()[-1])

    summary = json.loads((out / "summary.json").read_text())["gsm8k"]
    assert printed == {"gsm8k": summary}
    samples_file = out / "gsm8k.samples.jsonl"
    written = lines(samples_file)
    # exactly n × k samples, each problem once
    assert sorted(row["id"] for row in written) == ["0", "1", "2"]
    assert [len(row["samples"]) for row in written] == [2, 2, 2]
    bench = get_benchmark("gsm8k")
    for row in written:
        for sample in row["samples"]:
            assert sample["policy_version"] == 0 and sample["n_tokens"] <= 8
            assert sample["answer"] == extract_answer(bench, sample["text"])
            assert set(sample["components"]) == {"accuracy_gsm8k"}

    # the reference: the same samples scored again in this process
    reference, _ = evaluate(read_samples(samples_file, 2), bench, workers=1)
    summary.pop("settings")
    assert summary == json.loads(json.dumps(reference))
    assert summary["problems"] == 3 and summary["k"] == 2


def test_a_killed_generate_resumes_without_losing_or_repeating_a_sample(
    tmp_path, parts, tiny_model_dir
):
    prompts = tmp_path / "prompts.jsonl"
    problems = write_prompts(prompts, [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1)])
    out = tmp_path / "samples.jsonl"
    argv = [*AHA, "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    argv += ["--k", "3", "--max-tokens", "8", "--rewards", "accuracy_gsm8k"]
    argv += ["--nats-url", parts.url, "--window", "2", "-o", str(out)]

    first = subprocess.Popen(argv, env=JOB, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_line_then(first, out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = out.read_text().count("\n")
    assert 1 <= kept < len(problems)

    again = subprocess.run([*argv, "--resume"], env=JOB, capture_output=True, timeout=180)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    written = lines(out)
    ids = [row["id"] for row in written]
    assert sorted(ids) == ["1", "2", "3", "4", "5"]  # every problem once (ids: line numbers)
    for row in written:
        assert len(row["samples"]) == 3
        assert row["reference"] == problems[int(row["id"]) - 1][1]
        for sample in row["samples"]:
            assert sample["reward"] in (0.0, 1.0) and sample["error"] is None

    # without --resume an existing output is refused, before anything starts
    refused = subprocess.run(argv, env=ENV, capture_output=True, timeout=60)
    assert refused.returncode == 2
    assert b"exists; --resume continues it" in refused.stderr


def test_an_actor_killed_midway_loses_no_sample(tmp_path, parts, tiny_model_dir):
    """The actor is SIGKILLed while the job runs (one task at a time, so it holds one); its
    task comes back to a new actor after the ack wait, and every problem ends once, whole."""
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [(1, 2), (3, 4), (5, 6), (7, 8)])
    out = tmp_path / "samples.jsonl"
    argv = [*AHA, "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    argv += ["--k", "2", "--max-tokens", "8", "--rewards", "accuracy_gsm8k"]
    argv += ["--nats-url", parts.url, "--window", "1", "-o", str(out)]
    job = subprocess.Popen(argv, env=JOB, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_line_then(job, out)
    parts.procs["actor"].send_signal(signal.SIGKILL)
    parts.start("actor", "actor-2")
    assert job.wait(timeout=180) == 0, job.stderr.read().decode()[-3000:]
    written = lines(out)
    assert sorted(row["id"] for row in written) == ["1", "2", "3", "4"]
    assert all(len(row["samples"]) == 2 for row in written)
