"""`aha up` side by side, in one run (issue 6, item 5): P6, P2 and P3 on one cold-start model.

    python benchmarks/up.py [--size demo|compute] [--steps N] [--skip-trl] [--cold-start PATH]

1. Prepares ONE cold-start model (a tiny Qwen2 + `aha sft`, `pipeline.coldstart`) and the
   demo's RL prompts and held-out set, so every contender starts from the same weights and
   sees the same prompts. `--size` picks the model (`SIZES`): `demo`, `aha up`'s 160k
   parameters, where per-message overhead dominates; `compute` (issue 12, item 3), 1.05M
   parameters, where one step's generation and update each take seconds on a core.
2. P6 + P2: `aha up --model COLD --max-steps N` with the default `--max-staleness 2` and with
   `--max-staleness 0` (synchronous), same seed: wall time for the steps, whole RL phase,
   held-out greedy accuracy and pass@1 after, the learner's share of time waiting for data.
3. P3: TRL's `GRPOTrainer` on the same model, prompts and rewards (`accuracy_gsm8k` + 0.1 ×
   `format_think`, `answer_tag`), G = 8, 16 prompts per step, lr 1e-4 constant, β = 0.01,
   clip 0.2, token-mean ("dapo") loss, 2 optimizer steps per batch (aha's `ppo_epochs = 2`
   is TRL's `num_iterations = 2`), AdamW β = (0.9, 0.99), grad clip 1, temperature 1, 64
   completion tokens, CPU, fp32, `--trl-threads` torch threads (2: the same 2 cores aha's
   actor and learner get, one each). TRL lives in its own venv (`--trl-venv`, made on
   first use: a fresh venv that sees the project's packages through a `.pth` file, with
   `trl` pip-installed into it), never in the project's.
4. Prints a table (each figure also as a ratio against the baseline: TRL, or aha synchronous
   with `--skip-trl`) and writes `benchmarks/results/up-<date>.json`.

Cores (`--pin`, on by default with ≥ 2 CPUs): every aha part runs one torch thread (as `aha
up` starts them); the benchmark pins every thread of the actor's processes to CPU 0 (vLLM's
CPU engine is told the same core through `VLLM_CPU_OMP_THREADS_BIND`) and the learner's to
CPU 1; the rewarder, NATS and the supervisor are left to the OS. TRL's one process may use
both. `--no-pin` leaves all of it to the OS.

What is measured, for every contender alike:
- `steps_s`: wall time from the end of step 1 to the end of step N (N − 1 steady-state steps;
  step 1 carries process start-up, vLLM's included, which `rl_s` counts);
- `rl_s`: the whole RL phase: aha's `rl_seconds` (parts started → learner exited), TRL's
  trainer construction + `train()` + save;
- `to_target_s` / `to_target_step`: wall time from the end of step 1 until the rolling mean
  over `--window` steps of the training-sample accuracy (temperature 1, fresh prompts every
  step, so an online pass@1 on unseen problems) first reaches `--target`. aha's samples can
  be up to `max_staleness` versions old, so its curve lags its policy by that much;
- `greedy` / `pass@1`: held-out accuracy of the final model, `pipeline.heldout.evaluate` on the
  same held-out problems (greedy, and `--eval-samples` samples at temperature 1);
- `wait`: the learner's share of wall time waiting for data (P2). aha: the learner's
  `wait_share` per step, weighted by `step_seconds`, steps 2..N. TRL: the share of `train()`
  spent generating and scoring (the trainer waits for its own data);
- where a step's time goes, between the ends of steps 1 and N, per step: `gen_s`, seconds of
  generation (aha: the union of the actor's `rollout` log lines' generation intervals; TRL:
  seconds in its `_generate`); `update_s`, seconds of training (aha: the learner's
  `train_seconds`, its reference and behaviour log-prob passes included; TRL: the rest of the
  window, which holds those passes and scoring);
- `actor_idle`: the actor's share of that window with neither a task in its engine nor weights
  loading (from the actor's `rollout` and `weights loaded` lines, `actor_load` the latter's
  share; TRL: the share not generating, the generator idles while the trainer trains).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT
"""Where the code the contenders run lives (a snapshot of HEAD unless `--source worktree`)."""
# Run as a script, this file's folder comes first on sys.path and its modules would shadow
# the project's packages (benchmarks/learner.py vs `learner`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES: dict[str, dict[str, int]] = {
    "demo": {},
    "compute": {
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 4,
        "intermediate_size": 512,
    },
}
"""`pipeline.tiny_model.TinySpec` fields per `--size` (the rest: `TinySpec`'s defaults; `demo`
is the 162,560-parameter 2-head model `aha up`'s demo trained when the README's figures for it
were measured, before it moved to `DEMO_SPEC`'s 4 heads). `compute`
(1,054,848 parameters, heads of 32, which vLLM's CPU attention runs) was sized by measuring
one GRPO step (16 prompts × G 8, 2 PPO epochs) on one core of a busy 2-core machine: ~2.6 s
of vLLM generation and ~6.6 s of learner update. At hidden 256 and FFN 768 (3.4M) generation
stayed ~2.8 s while the update grew to ~12.6 s and a cold-start SFT step from ~0.5 s to
~1.3 s: a slower benchmark, further from balance."""

ACTOR_CPU, LEARNER_CPU = 0, 1
"""The cores `--pin` gives aha's actor and learner."""

TRL_VERSION = "1.16.0"
"""The TRL release this benchmark was written against (transformers 5, torch 2.13 CPU)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per contender (N)")
    p.add_argument("--size", choices=list(SIZES), default="demo", help="the model (SIZES)")
    p.add_argument("--skip-trl", action="store_true", help="leave out P3 (TRL's GRPOTrainer)")
    p.add_argument("--cold-start", help="reuse this cold-start HF folder instead of making one")
    p.add_argument("--cold-start-steps", type=int, default=1400, help="SFT steps of the cold start")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per problem for pass@1")
    p.add_argument("--target", type=float, default=0.6, help="target training-sample accuracy")
    p.add_argument("--window", type=int, default=5, help="steps in the rolling mean for --target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["vllm", "hf"], help="aha actors' engine (default: aha's)")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help=f"pin aha's actor to CPU {ACTOR_CPU} and its learner to CPU {LEARNER_CPU}",
    )
    p.add_argument("--trl-threads", type=int, default=2, help="TRL's torch threads")
    p.add_argument(
        "--trl-venv", default="/tmp/aha-trl-venv", help="TRL's own venv (made if missing)"
    )
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where the benchmark's runs go")
    p.add_argument("--name", help="benchmark run name (default: bench-up-<time>)")
    p.add_argument("--out", help="results JSON (default: benchmarks/results/up-<date>.json)")
    p.add_argument(
        "--source",
        choices=["head", "worktree"],
        default="head",
        help="code to benchmark: the committed HEAD (a snapshot) or the working tree",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the figures (up_time_to_accuracy, up_async_vs_sync) as JSON lines on stdout",
    )
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: run TRL from a spec file
    args = p.parse_args(argv)
    if args.trl_threads < 1:
        p.error(f"--trl-threads must be at least 1, got {args.trl_threads}")
    if args.pin and (os.cpu_count() or 1) < 2:
        p.error(
            f"--pin needs 2 CPUs (one for the actor, one for the learner); {os.cpu_count()} here"
        )
    return args


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def say(*parts) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# -- figures from per-step records ------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line
    return rows


def step_figures(steps: list[dict], target: float, window: int) -> dict:
    """`steps`: one dict per GRPO step, in order, with `time` (end of the step, epoch s) and
    `accuracy` (training samples). Steady-state time and time to the target accuracy."""
    if not steps:
        return {"steps": 0}
    t1, tn = steps[0]["time"], steps[-1]["time"]
    acc = [s["accuracy"] for s in steps]
    to_target = None
    for i in range(window - 1, len(acc)):
        if statistics.fmean(acc[i - window + 1 : i + 1]) >= target:
            to_target = i
            break
    return {
        "steps": len(steps),
        "steps_s": round(tn - t1, 2),
        "step_mean_s": round((tn - t1) / max(len(steps) - 1, 1), 3),
        "to_target_step": None if to_target is None else to_target + 1,
        "to_target_s": None if to_target is None else round(steps[to_target]["time"] - t1, 2),
        "sample_accuracy_first": round(acc[0], 4),
        "sample_accuracy_last_window": round(statistics.fmean(acc[-window:]), 4),
        "response_length_last": round(steps[-1].get("response_length", float("nan")), 2),
    }


# -- the cold start ----------------------------------------------------------------------------


def size_spec(size: str):
    """The `TinySpec` of `--size` (imported late: after `snapshot`, from the code under test)."""
    from pipeline.tiny_model import TinySpec

    return TinySpec(**SIZES[size])


def count_parameters(model: Path) -> int:
    """Parameters in an HF folder's safetensors (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def prepare(args, bench_dir: Path):
    """The demo's RL prompts, held-out set and (unless given) one cold-start model."""
    from pipeline.coldstart import cold_start_model, demo_data

    (bench_dir / "logs").mkdir(parents=True, exist_ok=True)
    n = max(4 * args.steps * 16, 2000)  # as `aha up` makes them: 16 prompts a step
    dataset, held_out = demo_data(
        bench_dir, eval_problems=args.eval_problems, rl_problems=n, seed=args.seed
    )
    if args.cold_start:
        return Path(args.cold_start).resolve(), dataset, held_out, None
    t = time.monotonic()
    say(
        f"cold start: {args.size} model, {args.cold_start_steps} SFT steps "
        f"(log: {bench_dir / 'logs' / 'cold-start.log'})"
    )
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    model = cold_start_model(
        bench_dir,
        held_out,
        steps=args.cold_start_steps,
        seed=args.seed,
        env=env,
        spec=size_spec(args.size),
    )
    return model, dataset, held_out, round(time.monotonic() - t, 1)


# -- cores and where the time goes ------------------------------------------------------------


def part_processes(marker: str) -> list[int]:
    """Pids of the processes whose `AHA_PART` is `marker`: `deploy.supervisor` sets it in every
    process of a part, so a part's children (vLLM's engine core) are found too."""
    needle = f"AHA_PART={marker}\0".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours
                continue
    return pids


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of `pids` onto `cpu` (an affinity is per thread: `taskset -a`)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                if os.sched_getaffinity(int(task.name)) != {cpu}:
                    os.sched_setaffinity(int(task.name), {cpu})
            except OSError:  # the thread ended
                continue


class Pinner(threading.Thread):
    """Keeps aha's actor on ACTOR_CPU and its learner on LEARNER_CPU while `aha up` runs.
    Parts start processes and threads at their own pace, so it looks again every half second."""

    def __init__(self, log_dir: Path):
        super().__init__(daemon=True)
        where = log_dir.resolve()
        self.cpus = {f"actor-0@{where}": ACTOR_CPU, f"learner@{where}": LEARNER_CPU}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for marker, cpu in self.cpus.items():
                pin(part_processes(marker), cpu)


def busy_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` (start, end) inside [start, end]: overlapping
    generations (an engine running several tasks) count once."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    total, reach = 0.0, start
    for a, b in clipped:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def actor_figures(log: Path, start: float, end: float, steps: int) -> dict:
    """The actor's time between `start` and `end` (epoch s, the ends of learner steps 1 and N,
    `steps` = N − 1 steps apart), from its log: each `rollout` line ends a generation of
    `seconds`, each `weights loaded` line a fetch + load; the rest is idle."""
    generating, loading, engine = [], [], None
    for r in read_jsonl(log):
        if not isinstance(r, dict) or "timestamp" not in r:
            continue  # vLLM's own lines
        t = datetime.fromisoformat(r["timestamp"]).timestamp()
        if r.get("event") == "rollout":
            generating.append((t - r["seconds"], t))
        elif r.get("event") == "weights loaded":
            loading.append((t - r["fetch_seconds"] - r["load_seconds"], t))
        elif r.get("event") == "actor ready":
            engine = r.get("backend")
    window = end - start
    if window <= 0 or steps < 1:
        return {"engine": engine}
    busy = busy_seconds(generating + loading, start, end)
    return {
        "engine": engine,
        "gen_s": round(busy_seconds(generating, start, end) / steps, 3),
        "actor_load": round(busy_seconds(loading, start, end) / window, 4),
        "actor_idle": round(1 - busy / window, 4),
    }


# -- aha -------------------------------------------------------------------------------------


def run_pinned(cmd: list[str], env: dict, log: Path, pin_logs: Path | None) -> tuple[int, str]:
    """Run `aha up` (stderr to `log`), pinning its actor and learner while it runs when
    `pin_logs` (its run's log folder, which names its parts) is given; (exit code, stdout)."""
    pinner = Pinner(pin_logs) if pin_logs else None
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=SRC, env=env
        )
        if pinner:
            pinner.start()
        try:
            stdout, _ = proc.communicate()
        finally:
            if pinner:
                pinner.done.set()
    return proc.returncode, stdout


def aha_time_split(steps: list[dict], actor_log: Path) -> dict:
    """The learner's wait and update and the actor's time (`actor_figures`) over steps 2..N
    of the learner's step records."""
    if not steps:
        return {}
    later = steps[1:]
    weighted = sum(r["wait_share"] * r["step_seconds"] for r in later)
    total = sum(r["step_seconds"] for r in later)
    return {
        "wait": round(weighted / total, 4) if total else None,
        "wait_mean_unweighted": round(statistics.fmean(r["wait_share"] for r in later), 4)
        if later
        else None,
        "wait_step1": round(steps[0]["wait_share"], 4),
        "step1_s": round(steps[0]["step_seconds"], 2),
        "update_s": round(statistics.fmean(r["train_seconds"] for r in later), 3)
        if later
        else None,
        **actor_figures(actor_log, steps[0]["time"], steps[-1]["time"], len(later)),
    }


def run_aha(args, bench_dir: Path, name: str, staleness: int, model: Path) -> dict:
    config = bench_dir / "bench-up.toml"
    config.write_text(
        "[up]\n"
        f"runs_dir = {json.dumps(str(bench_dir))}\n"
        f"eval_problems = {args.eval_problems}\n"
        f"eval_samples = {args.eval_samples}\n"
        f"seed = {args.seed}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "up",
        "--json",
        "--name",
        name,
        "--config",
        str(config),
        "--model",
        str(model),
        "--max-steps",
        str(args.steps),
        "--max-staleness",
        str(staleness),
    ]
    if args.engine:
        cmd += ["--engine", args.engine]
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}  # its own embedded server
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.pin:  # vLLM binds its engine's threads itself: to the actor's core, not its choice
        env.update(VLLM_CPU_OMP_THREADS_BIND=str(ACTOR_CPU))
    load_before = load()
    say(f"aha {name}: --max-staleness {staleness}, {args.steps} steps")
    t = time.monotonic()
    pin_logs = bench_dir / name / "logs" if args.pin else None
    returncode, stdout = run_pinned(cmd, env, bench_dir / f"{name}.stderr.log", pin_logs)
    wall = time.monotonic() - t
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise SystemExit(
            f"aha up {name} exited {returncode} without a summary; see "
            f"{bench_dir / (name + '.stderr.log')}"
        ) from e
    steps = [r for r in read_jsonl(bench_dir / name / "metrics.jsonl") if r.get("event") == "step"]
    return {
        "contender": f"aha max-staleness {staleness}",
        "exit_code": returncode,
        "ended": summary.get("ended"),
        **step_figures(steps, args.target, args.window),
        **aha_time_split(steps, bench_dir / name / "logs" / "actor-0.log"),
        "pinned": {"actor": ACTOR_CPU, "learner": LEARNER_CPU} if args.pin else None,
        "rl_s": summary.get("rl_seconds"),
        "process_wall_s": round(wall, 1),
        "greedy_before": summary.get("accuracy_before"),
        "pass_at_1_before": summary.get("pass_at_1_before"),
        "greedy": summary.get("accuracy_after"),
        "pass_at_1": summary.get("pass_at_1_after"),
        "length_after": summary.get("length_after"),
        "groups_trained": summary.get("groups_trained"),
        "groups_dropped_stale": summary.get("groups_dropped_stale"),
        "tasks_issued": summary.get("tasks_issued"),
        "max_staleness_trained": summary.get("max_staleness_trained"),
        "load_before": load_before,
        "load_after": load(),
        "run_dir": summary.get("run_dir"),
    }


# -- TRL -------------------------------------------------------------------------------------


def trl_python(venv: Path) -> Path:
    """TRL's own venv: sees the project's packages (torch, transformers) through a .pth file;
    `trl` and what it needs beyond them (accelerate, datasets) are installed into it only."""
    import sysconfig

    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.stdout.write(trl.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    base = getattr(sys, "_base_executable", None) or sys.executable
    say(f"making TRL's venv {venv} (pip install trl=={TRL_VERSION})")
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "aha-project.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n" + str(ROOT) + "\n"
    )
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    return python


def run_trl(args, bench_dir: Path, model: Path, dataset: Path, held_out: list[dict]) -> dict:
    python = trl_python(Path(args.trl_venv))
    out = bench_dir / "trl"
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model),
                "dataset": str(dataset),
                "out": str(out),
                "steps": args.steps,
                "seed": args.seed,
                "group_size": 8,
                "prompts_per_step": 16,
                "lr": 1e-4,
                "beta": 0.01,
                "max_tokens": 64,
                "ppo_epochs": 2,
                "micro_batch": 32,
                "threads": args.trl_threads,
            }
        )
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.trl_threads),
        "MKL_NUM_THREADS": str(args.trl_threads),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(SRC),
    }
    load_before = load()
    say(f"TRL GRPOTrainer: {args.steps} steps, {args.trl_threads} threads (log: {out / 'trl.log'})")
    t = time.monotonic()
    with open(out / "trl.log", "w") as log:
        proc = subprocess.run(
            [str(python), str(Path(__file__).resolve()), "--trl-worker", str(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=SRC,
            env=env,
        )
    wall = time.monotonic() - t
    if proc.returncode != 0 or not (out / "result.json").exists():
        tail = (out / "trl.log").read_text()[-3000:]
        return {
            "contender": "TRL GRPOTrainer",
            "skipped": f"TRL run exited {proc.returncode}: {tail}",
        }
    res = json.loads((out / "result.json").read_text())
    from pipeline.heldout import evaluate

    say("evaluating TRL's final model")
    after = evaluate(out / "final", held_out, max_tokens=64, samples=args.eval_samples)
    return {
        "contender": f"TRL {res['trl_version']} GRPOTrainer",
        "exit_code": proc.returncode,
        **step_figures(res["steps"], args.target, args.window),
        "rl_s": res["rl_s"],
        "process_wall_s": round(wall, 1),
        "greedy": after.accuracy,
        "pass_at_1": after.pass_at_1,
        "length_after": after.mean_length,
        "wait": round(res["generate_s"] / res["train_s"], 4),
        **trl_time_split(res),
        "step1_s": res["step1_s"],
        "setup_s": res["setup_s"],
        "train_s": res["train_s"],
        "optimizer_steps": res["optimizer_steps"],
        "trl_version": res["trl_version"],
        "versions": res["versions"],
        "load_before": load_before,
        "load_after": load(),
        "run_dir": str(out),
    }


def trl_time_split(res: dict) -> dict:
    """Where TRL's time went between the ends of steps 1 and N, as for aha: `gen_s` its
    generation per step (each step's `sample_s`: seconds in `_generate` so far, read as its
    batch is scored), `update_s` the rest per step (scoring and the log-prob passes included,
    as aha's learner does them), `actor_idle` the share of the window not generating."""
    steps = res["steps"]
    window = steps[-1]["time"] - steps[0]["time"] if len(steps) > 1 else 0.0
    if window <= 0:
        return {}
    n = len(steps) - 1
    generating = steps[-1]["sample_s"] - steps[0]["sample_s"]  # batches 2..N
    return {
        "gen_s": round(generating / n, 3),
        "update_s": round((window - generating) / n, 3),
        "actor_idle": round(1 - generating / window, 4),
        "engine": f"transformers generate, {res['threads']} threads",
    }


def trl_worker(spec_path: str) -> None:
    """Runs inside TRL's venv: GRPOTrainer with aha's recipe, per-step records to result.json."""
    import types

    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    t_start = time.monotonic()
    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewarder.rewards import accuracy_gsm8k, format_think

    task = types.SimpleNamespace(meta={"answer_tag": True})  # what aha's tasks carry
    batches: list[dict] = []  # one per generation batch = one aha step
    generate_s = [0.0]  # generation, scoring and the old/reference log-prob passes
    sample_s = [0.0]  # generation alone

    def accuracy(completions, answer, completion_ids=None, **_):
        scores = [accuracy_gsm8k(c, a, task) for c, a in zip(completions, answer, strict=True)]
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else []
        batches.append(
            {
                "accuracy": statistics.fmean(scores),
                "n": len(scores),
                "response_length": statistics.fmean(lengths) if lengths else float("nan"),
                "sample_s": sample_s[0],  # this batch's generation included
            }
        )
        return scores

    def format_(completions, **_):
        return [format_think(c, None, task) for c in completions]

    rows = [json.loads(line) for line in open(spec["dataset"])]
    data = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    )
    G, P, mb = spec["group_size"], spec["prompts_per_step"], spec["micro_batch"]
    accum = G * P // mb  # 4 micro-batches of 32 = one optimizer step on the whole batch (as aha)
    config = GRPOConfig(
        output_dir=str(Path(spec["out"]) / "trainer"),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum,
        num_generations=G,
        num_iterations=spec["ppo_epochs"],  # aha's ppo_epochs: optimizer steps per batch
        max_steps=spec["steps"] * spec["ppo_epochs"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec["beta"],
        epsilon=0.2,
        loss_type="dapo",  # token-mean over the batch, aha's "token-mean"
        scale_rewards="group",
        reward_weights=[1.0, 0.1],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=spec["max_tokens"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=spec["seed"],
        data_seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t = time.monotonic()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                generate_s[0] += time.monotonic() - t

        def _generate(self, prompts):
            t = time.monotonic()
            try:
                return super()._generate(prompts)
            finally:
                sample_s[0] += time.monotonic() - t

    step_end: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_end[state.global_step] = time.time()

    accuracy.__name__, format_.__name__ = "accuracy_gsm8k", "format_think"
    trainer = Timed(
        model=model,
        reward_funcs=[accuracy, format_],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    setup_s = time.monotonic() - t_start
    t = time.monotonic()
    t_epoch = time.time()
    trainer.train()
    train_s = time.monotonic() - t
    trainer.save_model(str(Path(spec["out"]) / "final"))
    tokenizer.save_pretrained(str(Path(spec["out"]) / "final"))
    rl_s = time.monotonic() - t_start
    k = spec["ppo_epochs"]
    steps = [
        {"step": i + 1, "time": step_end[(i + 1) * k], **b}
        for i, b in enumerate(batches)
        if (i + 1) * k in step_end
    ]
    result = {
        "trl_version": trl.__version__,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
        "steps": steps,
        "optimizer_steps": trainer.state.global_step,
        "setup_s": round(setup_s, 2),
        "train_s": round(train_s, 2),
        "rl_s": round(rl_s, 2),
        "generate_s": round(generate_s[0], 2),
        "sample_s": round(sample_s[0], 2),
        "threads": torch.get_num_threads(),
        "step1_s": round(steps[0]["time"] - t_epoch, 2) if steps else None,
        "log_history": trainer.state.log_history,
    }
    Path(spec["out"], "result.json").write_text(json.dumps(result, indent=1, default=str))


# -- the table -------------------------------------------------------------------------------

COLUMNS = [
    ("steps_s", "steps 1→N s", "{:.1f}"),
    ("step_mean_s", "s/step", "{:.2f}"),
    ("rl_s", "RL phase s", "{:.1f}"),
    ("to_target_s", "to target s", "{:.1f}"),
    ("to_target_step", "@step", "{}"),
    ("greedy", "greedy", "{:.3f}"),
    ("pass_at_1", "pass@1", "{:.3f}"),
    ("wait", "wait share", "{:.3f}"),
    ("gen_s", "gen s/step", "{:.2f}"),
    ("update_s", "update s/step", "{:.2f}"),
    ("actor_idle", "actor idle", "{:.3f}"),
]


def table(rows: list[dict], baseline: dict) -> str:
    head = ["contender"] + [title for _, title, _ in COLUMNS]
    lines = []
    for row in rows:
        cells = [row["contender"] + (" (baseline)" if row is baseline else "")]
        for key, _, fmt in COLUMNS:
            v, b = row.get(key), baseline.get(key)
            if v is None:
                cells.append("—")
                continue
            cell = fmt.format(v)
            if (
                row is not baseline
                and key != "to_target_step"
                and isinstance(b, (int, float))
                and b
            ):
                cell += f" ({v / b:.2f}×)"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]

    def fmt_row(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt_row(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt_row(c) for c in lines])


def snapshot(args, bench_dir: Path) -> dict:
    """Run every contender on one fixed copy of the code: with `--source head` (default) the
    committed tree (`git archive HEAD`), so that edits others make to the shared working tree
    while the benchmark runs cannot change (or break) one contender and not another."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info = {"source": args.source, "commit": commit.stdout.strip() or None}
    if args.source == "worktree":
        return {**info, "path": str(ROOT)}
    src = bench_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit("git archive HEAD failed")
    global SRC
    SRC = src
    sys.path.insert(0, str(src))
    os.environ["PYTHONPATH"] = str(src)  # the parts aha up starts, and TRL's worker
    os.chdir(src)  # `python -m` puts the working directory first on sys.path
    say(f"code: {info['commit']} (git archive HEAD) in {src}")
    return {**info, "path": str(src)}


def report_figures(args, rows: list[dict], p6: dict) -> None:
    """`up_time_to_accuracy` (aha async's seconds to the target, baseline TRL's) and
    `up_async_vs_sync` (sync's wall time over async's for steps 1..N), each from this one run
    (a run takes an hour or more), into `benchmarks/results/up-<date>.jsonl` (with `--out
    FILE`, FILE's name with `.jsonl`)."""
    from benchmarks.figures import figure, report

    figures = []
    to_target = rows[0].get("to_target_s")  # aha with the default max-staleness 2
    trl = next((r.get("to_target_s") for r in rows if r["contender"].startswith("TRL")), None)
    if to_target:
        runs = [trl] if trl else None
        figures.append(
            figure(
                "up_time_to_accuracy",
                "s",
                [to_target],
                runs,
                higher=False,
                target=args.target,
                size=args.size,
            )
        )
    if p6.get("speedup_async_over_sync_steps"):
        speedup = p6["speedup_async_over_sync_steps"]
        figures.append(figure("up_async_vs_sync", "ratio", [speedup], size=args.size))
    if figures:
        out = str(Path(args.out).with_suffix(".jsonl")) if args.out else None  # beside --out
        report(figures, argparse.Namespace(json=args.json, out=out), "up")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    import structlog

    # Logs (the cold start's) to stderr: stdout carries the table and, with --json, the figures.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    for key in ("cold_start", "out", "trl_venv", "runs_dir"):  # relative to where it was started
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    os.chdir(ROOT)
    started, load_start = time.monotonic(), load()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = Path(args.runs_dir).resolve() / (args.name or f"bench-up-{stamp}")
    source = snapshot(args, bench_dir)
    model, dataset, held_out, cold_s = prepare(args, bench_dir)
    parameters = count_parameters(model)
    say(f"cold-start model: {model} ({parameters:,} parameters)")

    rows = [
        run_aha(args, bench_dir, "aha-async", 2, model),
        run_aha(args, bench_dir, "aha-sync", 0, model),
    ]
    async_, sync = rows
    trl_skipped = "--skip-trl" if args.skip_trl else None
    if not args.skip_trl:
        try:
            trl_row = run_trl(args, bench_dir, model, dataset, held_out)
        except Exception as e:  # no venv, no PyPI, an import error: say why and go on
            trl_row = {"contender": "TRL GRPOTrainer", "skipped": f"{type(e).__name__}: {e}"}
        if "skipped" in trl_row:
            trl_skipped = trl_row["skipped"]
            say(f"P3 skipped: {trl_skipped}")
        else:
            rows.append(trl_row)
    baseline = rows[2] if len(rows) == 3 else sync

    text = table(rows, baseline)
    ok = bool(async_.get("steps_s") and sync.get("steps_s"))
    p6 = {
        "steps_s_async_over_sync": round(async_["steps_s"] / sync["steps_s"], 3) if ok else None,
        "rl_s_async_over_sync": round(async_["rl_s"] / sync["rl_s"], 3) if ok else None,
        "speedup_async_over_sync_steps": round(sync["steps_s"] / async_["steps_s"], 3)
        if ok
        else None,
    }
    notes = [
        f"model: --size {args.size}, {parameters:,} parameters; aha's engine "
        f"{async_.get('engine')}; "
        + (
            f"actor pinned to CPU {ACTOR_CPU}, learner to CPU {LEARNER_CPU}"
            if args.pin
            else "aha's parts scheduled by the OS"
        )
        + f"; TRL {args.trl_threads} torch threads",
        f"N = {args.steps} steps, 16 prompts × G 8; target: rolling mean of {args.window} steps' "
        f"training-sample accuracy ≥ {args.target} (time from the end of step 1)",
        f"held-out: {args.eval_problems} problems, greedy and pass@1 over {args.eval_samples} samples; "
        f"cold start greedy {async_.get('greedy_before')}, pass@1 {async_.get('pass_at_1_before')}",
        f"P6: aha async/sync wall time for steps 1→N: {p6['steps_s_async_over_sync']}×, "
        f"whole RL phase {p6['rl_s_async_over_sync']}×",
        f"load average (1, 5, 15 min) at start {load_start}, at end {load()}; "
        f"{os.cpu_count()} CPUs",
    ]
    if trl_skipped:
        notes.append(f"P3 skipped: {trl_skipped}")
    failed = [
        r["contender"]
        for r in rows
        if r.get("ended", "finished") != "finished" or r.get("steps", 0) < args.steps
    ]
    if failed:
        notes.append(
            f"FAILED (fewer than {args.steps} steps or an abnormal end): {', '.join(failed)}"
        )
    notes.append(f"code: {source['commit']} ({source['source']})")
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout is the figures only
    print(text, file=human)
    print("\n".join("- " + n for n in notes), file=human)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_start": load_start,
        "load_end": load(),
        "args": {k: v for k, v in vars(args).items() if k != "trl_worker"},
        "code": source,
        "cold_start": {"model": str(model), "seconds": cold_s},
        "model": {"size": args.size, "spec": SIZES[args.size], "parameters": parameters},
        "baseline": baseline["contender"],
        "rows": rows,
        "p6": p6,
        "p3_skipped": trl_skipped,
        "table": text,
        "notes": notes,
        "total_s": round(time.monotonic() - started, 1),
        "bench_dir": str(bench_dir),
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"up-{time.strftime('%Y%m%d')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"results: {out}")
    report_figures(args, rows, p6)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
