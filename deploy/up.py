"""`aha up`: the whole loop on one machine, as separate processes talking through NATS.

With no arguments it runs the built-in demo (`pipeline/demo.py`): a 160k-parameter Qwen2
built from a config, a cold start on imperfect chains of thought, then GRPO through the
asynchronous loop — embedded NATS, one learner, N actors, M rewarders — with a live table,
and held-out accuracy before and after. Everything lands in `runs/<name>/`:

    aha.toml           the config every part was started with (reusable by hand)
    logs/<part>.log    one log per process
    metrics.jsonl      the learner's step lines
    summary.json       accuracy before/after, steps, wall time, task accounting
    curves.png         reward, accuracy, response length and KL over the steps
    final/             the trained model as an HF folder
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field, model_validator

from deploy.supervisor import SERVER, Part, Supervisor
from protocol.config import CONFIG, BusConfig, load_config, merge, read_file, read_jsonl
from protocol.messages import payload_limit

log = structlog.get_logger("deploy.up")


def _default_engine() -> str:
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") else "hf"


class UpConfig(BaseModel):
    """The `[up]` section: what `aha up` starts and how long it runs."""

    model_config = CONFIG

    name: str | None = None
    """Run name (folder under `runs_dir`); default: the start time."""
    runs_dir: str = "runs"
    """Where runs are written."""
    model: str | None = None
    """An HF causal-LM folder to train; None = the demo's tiny model with its cold start."""
    dataset: str | None = None
    """Prompt JSONL (GSM8K and MATH-500 formats work as they are); None = the demo task."""
    actors: int = Field(1, ge=1)
    """Actor processes."""
    rewarders: int = Field(1, ge=1)
    """Rewarder processes."""
    rewarder_workers: int = Field(1, ge=1)
    """Verifier processes per rewarder."""
    engine: Literal["vllm", "hf"] = Field(default_factory=_default_engine)
    """Actors' sampling engine: vLLM when installed, else the HF reference."""
    max_steps: int = Field(60, ge=1)
    """GRPO steps."""
    max_staleness: int = Field(2, ge=0)
    """η: the off-policy bound, in policy versions."""
    prompts_per_step: int = Field(16, ge=1)
    """Groups per GRPO step."""
    group_size: int = Field(8, ge=2)
    """G: completions per prompt."""
    lr: float = Field(1e-4, gt=0)
    """GRPO learning rate (DEMO.md: 2e-4 was faster but oscillated)."""
    beta: float = Field(0.01, ge=0)
    """k3 KL weight."""
    max_tokens: int = Field(64, ge=1)
    """Longest completion."""
    cold_start_steps: int = Field(1400, ge=0)
    """SFT steps of the demo's cold start (0 skips it)."""
    cold_start_recipe: Literal["think-or-guess", "buggy-carries"] = "think-or-guess"
    """DEMO.md recipe B (40 % chains, 60 % direct answers) or A (chains dropping 80 % of carries)."""
    eval_problems: int = Field(500, ge=1)
    """Held-out problems for accuracy before and after."""
    eval_samples: int = Field(4, ge=0)
    """Samples per problem at temperature 1 for pass@1 (0 skips it)."""
    seed: int = 0
    """Seed of the data, the model and the run."""
    shuffle_rewards: bool = False
    """Control experiment: rewards permuted across each batch; the model should not improve."""
    restart: bool = True
    """Restart actors and rewarders that die (the learner ending or dying ends the run)."""
    stall_after_s: float = Field(60.0, gt=0)
    """Seconds a stage may have work waiting without progress before it is reported stalled."""

    @model_validator(mode="after")
    def _dataset_needs_model(self):
        if self.dataset is not None and self.model is None:
            raise ValueError(
                "dataset: a real dataset needs a real model (--model PATH); "
                "the demo's tiny model only knows digits"
            )
        return self


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# -- steps of the run ------------------------------------------------------------------------


def demo_data(up: UpConfig, run_dir: Path) -> tuple[Path, list[dict]]:
    """The demo's RL prompts (a file) and its held-out set, which never meet."""
    from pipeline import demo

    evaluation = demo.held_out(up.eval_problems)
    exclude = {r["prompt"] for r in evaluation}
    n = max(4 * up.max_steps * up.prompts_per_step, 2000)
    rows = demo.rl_prompts(n, seed=up.seed + 1, exclude=exclude)
    return demo.write_jsonl(rows, run_dir / "data" / "rl.jsonl"), evaluation


def cold_start_model(up: UpConfig, run_dir: Path, held_out: list[dict], python: str) -> Path:
    """The tiny model from a config, then `aha sft` on imperfect chains (DEMO.md recipes)."""
    from pipeline import demo
    from pipeline.tiny_model import TinySpec, save_tiny_model

    base = save_tiny_model(run_dir / "base", TinySpec(seed=up.seed))
    if up.cold_start_steps == 0:
        return base
    recipe = (
        dict(chain_share=0.4, drop_carry=0.0)
        if up.cold_start_recipe == "think-or-guess"
        else dict(chain_share=1.0, drop_carry=0.8)
    )
    exclude = {r["prompt"] for r in held_out}
    pairs = demo.write_jsonl(
        demo.cold_start(up.cold_start_steps * 64, seed=up.seed + 2, exclude=exclude, **recipe),
        run_dir / "data" / "cold_start.jsonl",
    )
    config = run_dir / "sft.toml"
    config.write_text(
        _toml(
            {
                "learner": {
                    "model": {"path": str(base)},
                    "batch": 64,
                    "serving_dtype": "float32",
                    "checkpoint_dir": str(run_dir / "sft-checkpoints"),
                    "seed": up.seed,
                    "optim": {"lr": 2e-3, "schedule": "cosine", "total_steps": up.cold_start_steps},
                    "deepspeed": {"precision": "fp32", "micro_batch": 64},
                    "grpo": {"beta": 0.0},
                }
            }
        )
    )
    out = run_dir / "cold-start"
    log.info("cold start", steps=up.cold_start_steps, recipe=up.cold_start_recipe)
    with open(run_dir / "logs" / "cold-start.log", "wb") as f:
        subprocess.run(
            [
                python,
                "-m",
                "deploy.cli",
                "sft",
                "--config",
                str(config),
                "--data",
                str(pairs),
                "--out",
                str(out),
                "--steps",
                str(up.cold_start_steps),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, **_part_env()},
        )
    return out


def dataset_settings(up: UpConfig, dataset: Path) -> dict[str, Any]:
    """Field mapping, template and rewards for the dataset (demo, GSM8K or MATH-500)."""
    if up.dataset is None:  # the demo: {"prompt": "Q:123+456=", "answer": "579"}
        prompt_field, template, accuracy = "prompt", "none", "accuracy_gsm8k"
    else:
        _, first = next(read_jsonl(dataset))  # the first row, blank lines skipped
        if "question" in first:  # GSM8K: {"question", "answer": "... #### 72"}
            prompt_field, template, accuracy = "question", "r1-zero", "accuracy_gsm8k"
        else:  # MATH-500 and friends: {"problem", "answer"} (LaTeX)
            prompt_field, template, accuracy = "problem", "r1-zero", "accuracy_math"
    return {
        "path": str(dataset),
        "prompt_field": prompt_field,
        "answer_field": "answer",
        "template": template,
        "rewards": {accuracy: 1.0, "format_think": 0.1},
        "meta": {"answer_tag": True},
    }


def write_run_config(
    up: UpConfig,
    run_dir: Path,
    model: Path,
    dataset: Path,
    nats_url: str,
    parts: dict[str, Any] | None = None,
) -> Path:
    """The one config file every part reads (also usable to start the parts by hand).

    `parts` — the `[bus]`, `[learner]`, `[actor]` and `[rewarder]` sections of the user's
    `--config` file — is merged over what `aha up` chooses, key by key (e.g. bf16 on GPUs).
    """
    config = {
        "bus": {"url": nats_url},
        "learner": {
            "model": {"path": str(model)},
            "batch": up.prompts_per_step,
            "max_staleness": up.max_staleness,
            "max_steps": up.max_steps,
            "serving_dtype": "float32",
            "shard_mb": 64,
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "weights_dir": str(run_dir / "weights"),
            "metrics_file": str(run_dir / "metrics.jsonl"),
            "final_model_dir": str(run_dir / "final"),
            "seed": up.seed,
            "ranks": 1,  # the actors share this machine's GPUs: one learner rank, not one per GPU
            "optim": {"lr": up.lr},
            "deepspeed": {"precision": "fp32", "micro_batch": 32},
            "grpo": {
                "beta": up.beta,
                "mode": "token-mean",
                "ppo_epochs": 2,
                "shuffle_rewards": up.shuffle_rewards,
            },
            "dataset": {
                **dataset_settings(up, dataset),
                "group_size": up.group_size,
                "max_tokens": up.max_tokens,
                "temperature": 1.0,
                "seed": up.seed,
            },
        },
        "actor": {"model": str(model), "backend": up.engine},
        "rewarder": {"workers": up.rewarder_workers},
    }
    config = merge(config, {k: v for k, v in (parts or {}).items() if k != "up"})
    config["bus"]["url"] = nats_url  # the run's server, whatever the file says
    path = run_dir / "aha.toml"
    path.write_text(_toml(config))
    return path


def _toml(data: dict, prefix: str = "") -> str:
    """TOML for our nested dicts of scalars and lists (None values are left out)."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out = f"[{prefix}]\n" if prefix and (scalars or not tables) else ""
    out += "".join(
        f"{_key(k)} = {json.dumps(v, default=_json_default)}\n" for k, v in scalars.items()
    )
    out += "\n" if out else ""
    for key, value in tables.items():
        out += _toml(value, f"{prefix}.{_key(key)}" if prefix else _key(key))
    return out


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _part_env() -> dict[str, str]:
    # One torch thread per process: two were 2-5x slower here while anything else ran.
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def start_parts(up: UpConfig, sup: Supervisor, config: Path, python: str) -> None:
    aha = [python, "-m", "deploy.cli"]
    env = _part_env()
    sup.start(Part("learner", [*aha, "learner", "--config", str(config)], env, stop_order=0))
    for i in range(up.actors):
        sup.start(
            Part(
                f"actor-{i}",
                [*aha, "actor", "--config", str(config), "--actor-id", f"actor-{i}"],
                env,
                restart=up.restart,
                stop_order=1,
            )
        )
    for i in range(up.rewarders):
        sup.start(
            Part(
                f"rewarder-{i}",
                [*aha, "rewarder", "--config", str(config)],
                env,
                restart=up.restart,
                stop_order=2,
            )
        )


class MetricsTail:
    """The learner's metrics file, read incrementally (only the lines added since last time)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.rows: list[dict] = []

    def read(self) -> list[dict]:
        if self.path.exists():
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]  # a line being written waits
            self.offset += len(complete.encode())
            self.rows += [json.loads(line) for line in complete.splitlines() if line.strip()]
        return self.rows

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.rows if r.get("event") == "step"]


def render(up: UpConfig, steps: list[dict], depth: dict | None, elapsed: float, stalls=None):
    from rich.table import Table

    table = Table(title=f"aha up — {elapsed:.0f}s", title_justify="left")
    for col in ("step", "version", "reward", "accuracy", "length", "staleness", "kl", "tok/s"):
        table.add_column(col, justify="right")
    for row in steps[-12:]:
        table.add_row(
            f"{row['step']}/{up.max_steps}",
            str(row.get("version", "")),
            f"{row.get('reward', 0):.3f}",
            f"{row.get('accuracy', 0):.3f}",
            f"{row.get('response_length', 0):.1f}",
            f"{row.get('staleness_mean', 0):.2f}",
            f"{row.get('kl', 0):.4f}",
            f"{row.get('tokens_per_s', 0):.0f}",
        )
    if depth:
        queues = "  ".join(
            f"{stage}: {d['pending']} pending / {d['ack_pending']} leased"
            for stage, d in depth.items()
            if stage != "dead"
        )
        table.caption = f"{queues}  dead: {depth['dead']['messages']}"
        for stall in (stalls or {}).values():
            table.caption += (
                f"\n[red]{stall.stage} stalled: {stall.pending} pending, {stall.ack_pending} "
                f"leased, no progress for {stall.seconds:.0f}s[/]"
            )
    return table


async def _connect(bus_config, timeout: float = 30.0):
    from protocol.bus import Bus

    # Bounded: connecting retries forever, and a server that is gone must not hang the run.
    return await asyncio.wait_for(Bus.connect(bus_config, name="aha-up", setup=False), timeout)


async def _read_depth(bus):
    """`queue_depth` now, None if the server does not answer (it may be restarting)."""
    from protocol.depth import queue_depth

    try:
        return await queue_depth(bus.js)
    except Exception as e:  # a view must not end the run
        log.warning("queue depth unavailable", error=repr(e))
        return None


async def _setup_streams(bus_config) -> None:
    from protocol.bus import Bus

    bus = await Bus.connect(bus_config.model_copy(update={"setup_streams": True}), name="aha-up")
    await bus.close()


async def watch(
    up: UpConfig, sup: Supervisor, metrics: MetricsTail, bus_config, started: float
) -> tuple[str, int | None]:
    """Live table until the learner exits. Returns why the run ended and the learner's code.

    Every second: parts and the server that died are reported (and restarted by the
    supervisor), queue depth is read, and stages that stalled are reported.
    """
    from rich.console import Console
    from rich.live import Live

    from protocol.depth import StallWatch

    console = Console(stderr=True)
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    if live:
        live.start()
    bus = await _connect(bus_config)
    stalled = StallWatch(up.stall_after_s)
    reported = 0
    try:
        while True:
            for ex in sup.poll():
                console.print(
                    f"[red]{ex.name} exited with {ex.returncode}"
                    f"{' (restarting)' if ex.restarted else ''}[/]\n{ex.log_tail}"
                )
                if ex.name == "learner":
                    ok = ex.returncode == 0
                    return (
                        "finished" if ok else f"learner exited with {ex.returncode}"
                    ), ex.returncode
                if ex.name == SERVER and not ex.restarted:
                    return "nats-server died and could not be restarted", None
            metrics.read()
            steps = metrics.steps
            reading = await _read_depth(bus)
            stalls = stalled.update(reading) if reading else {}
            depth = {k: v.as_dict() for k, v in reading.items()} if reading else None
            if live:
                table = render(up, steps, depth, time.monotonic() - started, stalls)
                live.update(table, refresh=True)
            else:
                for row in steps[reported:]:
                    keys = ("step", "version", "reward", "accuracy", "response_length")
                    log.info("step", **{k: row[k] for k in keys if k in row})
                reported = len(steps)
            await asyncio.sleep(1.0)
    finally:
        if live:
            live.stop()
        await bus.close()


def plot(steps: list[dict], path: Path) -> Path | None:
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    panels = [
        ("reward", "reward (mean)"),
        ("accuracy", "accuracy (train samples)"),
        ("response_length", "response length (tokens)"),
        ("kl", "KL to reference (k3)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        ax.plot(x, [r.get(key, float("nan")) for r in steps], marker=".", linewidth=1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.suptitle("aha up: GRPO through the asynchronous loop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def in_flight(bus_config) -> int | None:
    """Tasks still somewhere in the loop: messages left in the three work queues (None,
    logged, when the server cannot be reached)."""
    try:
        bus = await _connect(bus_config)
    except Exception as e:
        log.error("in-flight count unavailable: no server", error=repr(e))
        return None
    try:
        depth = await _read_depth(bus)
    finally:
        await bus.close()
    if depth is None:
        return None
    return sum(depth[s].messages for s in ("tasks", "rollouts", "scored"))


# -- the command ------------------------------------------------------------------------------


@contextlib.contextmanager
def nats_server(
    run_dir: Path, url: str | None = None, max_payload: int = 8 << 20
) -> Iterator[tuple[str, Any]]:
    """`NATS_URL`, else `url` (the config's `[bus] url`), else an embedded server for the
    run (stopped at the end). Yields the URL and the embedded server (None for another)."""
    from protocol.server import NatsServer

    if os.environ.get("NATS_URL") or url:
        yield os.environ.get("NATS_URL") or url, None
        return
    with NatsServer(run_dir / "nats", max_payload=max_payload) as server:
        yield server.url, server


def held_out_accuracy(model: Path, held_out: list[dict], up: UpConfig, when: str):
    """Greedy accuracy (and pass@1) on the demo's held-out set; None without one."""
    if not held_out or not (Path(model) / "config.json").exists():
        return None
    from pipeline.heldout import evaluate

    result = evaluate(model, held_out, max_tokens=up.max_tokens, samples=up.eval_samples)
    log.info(f"accuracy {when}", **result.as_dict())
    return result


@dataclass
class LoopResult:
    ended: str
    exit_codes: dict[str, int]
    restarts: dict[str, int]
    seconds: float
    in_flight: int | None
    metrics: MetricsTail


def run_loop(
    up: UpConfig, run_dir: Path, config: Path, bus_config, started: float, server=None
) -> LoopResult:
    """Learner, actors and rewarders as processes until the learner is done; then stop all
    and count what is left in the queues. An embedded `server` that dies is restarted."""
    sup = Supervisor(run_dir / "logs")
    if server is not None:
        sup.watch_server(server)
    metrics = MetricsTail(run_dir / "metrics.jsonl")
    loop_started = time.monotonic()
    learner_code = None
    try:
        start_parts(up, sup, config, sys.executable)
        ended, learner_code = asyncio.run(watch(up, sup, metrics, bus_config, started))
    except KeyboardInterrupt:
        ended = "interrupted"
    except Exception as e:  # the run still ends with its parts stopped and a summary
        log.exception("supervision failed")
        ended = f"supervision failed: {e!r}"
    finally:
        codes = sup.stop()
        sup.poll_server()  # the count below needs the server up
    if learner_code is not None:
        codes["learner"] = learner_code
    seconds = time.monotonic() - loop_started
    metrics.read()
    return LoopResult(
        ended, codes, sup.restarts, seconds, asyncio.run(in_flight(bus_config)), metrics
    )


def summarize(
    up: UpConfig, name: str, run_dir: Path, loop: LoopResult, before, after, started: float
) -> dict:
    steps = loop.metrics.steps
    done = next((r for r in reversed(loop.metrics.rows) if r.get("event") == "done"), {})
    final = run_dir / "final"

    def of(result, field: str):
        return getattr(result, field) if result else None

    return {
        "name": name,
        "ended": loop.ended,
        "exit_codes": loop.exit_codes,
        "restarts": loop.restarts,
        "accuracy_before": of(before, "accuracy"),
        "accuracy_after": of(after, "accuracy"),
        "pass_at_1_before": of(before, "pass_at_1"),
        "pass_at_1_after": of(after, "pass_at_1"),
        "length_before": of(before, "mean_length"),
        "length_after": of(after, "mean_length"),
        "thinking_share_before": of(before, "thinking_share"),
        "thinking_share_after": of(after, "thinking_share"),
        "steps": len(steps),
        "wall_seconds": round(time.monotonic() - started, 1),
        "rl_seconds": round(loop.seconds, 1),
        "tasks_issued": done.get("tasks_issued"),
        "groups_trained": done.get("groups_trained"),
        "groups_dropped_stale": done.get("groups_dropped_stale"),
        "groups_dropped_zero_variance": done.get("groups_dropped_zero_variance"),
        "groups_dropped_no_reward": done.get("groups_dropped_no_reward"),
        "groups_dropped_too_large": done.get("groups_dropped_too_large"),
        "groups_dead": done.get("groups_dead"),
        "groups_foreign": done.get("groups_foreign"),
        "steps_nonfinite": done.get("steps_nonfinite"),
        "groups_in_flight_at_stop": loop.in_flight,
        "policy_versions_trained_on": sorted(
            {v for r in steps for v in r.get("policy_versions", [])}
        ),
        "max_staleness_trained": max((r.get("staleness_max", 0) for r in steps), default=None),
        "max_staleness_bound": up.max_staleness,
        "final_model": str(final) if (final / "config.json").exists() else None,
        "plot": str(plot(steps, run_dir / "curves.png") or ""),
        "run_dir": str(run_dir),
    }


def run(up: UpConfig, *, json_out: bool, config_file: str | None = None) -> dict:
    """The run, step by step; returns (and writes) its summary."""
    from protocol.log import setup_logging

    setup_logging("up")
    # SIGTERM (`timeout`, a service manager) as Ctrl-C: the parts stopped in order, a summary.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    name = up.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(up.runs_dir).resolve() / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    parts = read_file(config_file) if config_file else {}
    # Sized for the configured groups (NATS's default of 1 MiB is too small for long ones).
    max_payload = payload_limit(up.group_size, up.max_tokens)
    with nats_server(run_dir, (parts.get("bus") or {}).get("url"), max_payload) as (url, server):
        bus_config = load_config(BusConfig, overrides={**(parts.get("bus") or {}), "url": url})
        asyncio.run(_setup_streams(bus_config))
        log.info("run", dir=str(run_dir), nats=url)
        if up.dataset is None:
            dataset, held_out = demo_data(up, run_dir)
        else:
            dataset, held_out = Path(up.dataset), []
        model = (
            Path(up.model) if up.model else cold_start_model(up, run_dir, held_out, sys.executable)
        )
        before = held_out_accuracy(model, held_out, up, "before")
        config = write_run_config(up, run_dir, model, dataset, url, parts)
        loop = run_loop(up, run_dir, config, bus_config, started, server)
    after = held_out_accuracy(run_dir / "final", held_out, up, "after")
    summary = summarize(up, name, run_dir, loop, before, after, started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if json_out:
        print(json.dumps(summary), flush=True)
    else:
        from rich.console import Console

        Console().print_json(json.dumps(summary))
    return summary


def main(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "dataset": args.dataset,
            "actors": args.actors,
            "rewarders": args.rewarders,
            "max_steps": args.max_steps,
            "max_staleness": args.max_staleness,
            "name": args.name,
            "seed": args.seed,
            "engine": args.engine,
            "cold_start_steps": args.cold_start_steps,
            "shuffle_rewards": args.shuffle_rewards or None,
        }.items()
        if v is not None
    }
    up = load_config(UpConfig, args.config, section="up", overrides=overrides)
    from deploy.preflight import check_up

    check_up(up, args.config)  # every input, before the server, the cold start or a model load
    summary = run(up, json_out=args.json, config_file=args.config)
    return 0 if summary["ended"] == "finished" else 1
