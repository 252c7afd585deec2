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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import tomli_w
from pydantic import BaseModel, Field, model_validator

from deploy.live import MetricsTail, in_flight, watch
from deploy.supervisor import Part, Supervisor
from pipeline.coldstart import Recipe
from pipeline.presets import dataset_settings
from protocol.config import CONFIG, BusConfig, load_config, merge, read_config, sets_in
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
    cold_start_recipe: Recipe = "think-or-guess"
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
                **dataset_settings(dataset, demo=up.dataset is None),
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
    path.write_text(tomli_w.dumps(config))
    return path


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


async def _setup_streams(bus_config) -> None:
    from protocol.bus import Bus

    bus = await Bus.connect(bus_config.model_copy(update={"setup_streams": True}), name="aha-up")
    await bus.close()


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
        ended, learner_code = asyncio.run(
            watch(
                sup,
                metrics,
                bus_config,
                max_steps=up.max_steps,
                stall_after_s=up.stall_after_s,
                started=started,
            )
        )
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
    from pipeline.plots import plot_curves

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
        "plot": str(plot_curves(steps, run_dir / "curves.png") or ""),
        "run_dir": str(run_dir),
    }


def prepare(up: UpConfig, run_dir: Path) -> tuple[Path, list[dict], Path]:
    """The prompts, the held-out set (the demo's; none for a dataset) and the model to train:
    `--model`, else the demo's cold start."""
    from pipeline.coldstart import cold_start_model, demo_data

    if up.dataset is None:
        n = max(4 * up.max_steps * up.prompts_per_step, 2000)
        dataset, held_out = demo_data(
            run_dir, eval_problems=up.eval_problems, rl_problems=n, seed=up.seed
        )
    else:
        dataset, held_out = Path(up.dataset), []
    if up.model:
        return dataset, held_out, Path(up.model)
    model = cold_start_model(
        run_dir,
        held_out,
        steps=up.cold_start_steps,
        recipe=up.cold_start_recipe,
        seed=up.seed,
        env=_part_env(),
    )
    return dataset, held_out, model


def evaluate(model: Path, held_out: list[dict], up: UpConfig, when: str):
    """Held-out accuracy and pass@1 of `model` (None without a held-out set or a model)."""
    from pipeline.heldout import held_out_accuracy

    result = held_out_accuracy(model, held_out, max_tokens=up.max_tokens, samples=up.eval_samples)
    if result:
        log.info(f"accuracy {when}", **result.as_dict())
    return result


def run(
    up: UpConfig, *, json_out: bool, config_file: str | None = None, sets: list[str] = ()
) -> dict:
    """The run, step by step; returns (and writes) its summary."""
    from protocol.log import setup_logging

    setup_logging("up")
    # SIGTERM (`timeout`, a service manager) as Ctrl-C: the parts stopped in order, a summary.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    name = up.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(up.runs_dir).resolve() / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    parts = read_config(config_file, sets)  # the parts' sections, with --set
    # Sized for the configured groups (NATS's default of 1 MiB is too small for long ones).
    max_payload = payload_limit(up.group_size, up.max_tokens)
    with nats_server(run_dir, (parts.get("bus") or {}).get("url"), max_payload) as (url, server):
        bus_config = load_config(BusConfig, overrides={**(parts.get("bus") or {}), "url": url})
        asyncio.run(_setup_streams(bus_config))
        log.info("run", dir=str(run_dir), nats=url)
        dataset, held_out, model = prepare(up, run_dir)
        before = evaluate(model, held_out, up, "before")
        config = write_run_config(up, run_dir, model, dataset, url, parts)
        loop = run_loop(up, run_dir, config, bus_config, started, server)
    after = evaluate(run_dir / "final", held_out, up, "after")
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
    up = load_config(
        UpConfig, args.config, section="up", overrides=overrides, sets=sets_in(args.set, "up")
    )
    from deploy.preflight import check_up

    # every input, before the server, the cold start or a model load
    check_up(up, args.config, args.set)
    summary = run(up, json_out=args.json, config_file=args.config, sets=args.set)
    return 0 if summary["ended"] == "finished" else 1
