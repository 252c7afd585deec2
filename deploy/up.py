"""`aha up`: the whole loop on one machine, as separate processes talking through NATS.

With no arguments it runs the built-in demo (`pipeline/demo.py`): a 211k-parameter Qwen3
built from a config, a cold start on imperfect chains of thought, then GRPO through the
asynchronous loop — embedded NATS, one learner, N actors, M rewarders — with a live table,
and held-out accuracy before and after. Everything lands in `runs/<name>/`:

    aha.toml           the config every part was started with (reusable by hand)
    logs/<part>.log    one log per process
    metrics.jsonl      the learner's step lines
    summary.json       accuracy before/after, steps, wall time, task accounting
    curves.png         reward, accuracy, response length and KL over the steps
    final/             the trained model as an HF folder
    base/, cold-start/, data/, heldout-*.json   the demo's models, prompts and evaluations
    checkpoints/, nats/                          what `aha up --resume` continues from

This module is the command: what it starts and in which order. What it shows is
`deploy/live.py`; the demo's cold start, presets and plots are in `pipeline/`.
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
from typing import Any

import structlog

from deploy.live import (
    MetricsTail,
    in_flight,
    log_above_the_table,
    print_summary,
    progress_bar,
    watch,
)
from deploy.runconfig import UpConfig, learner_flags, read_parts, write_run_config
from deploy.supervisor import Part, Supervisor
from learner.outcomes import Outcome
from protocol.config import (
    BusConfig,
    ConfigError,
    load_config,
    nest,
    sets_in,
)
from protocol.messages import payload_limit

log = structlog.get_logger("deploy.up")


def _part_env() -> dict[str, str]:
    # One torch thread per process: two were 2-5x slower here while anything else ran.
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def start_parts(up: UpConfig, sup: Supervisor, config: Path, python: str, resume: bool) -> None:
    """The learner (from its checkpoint when `resume`), the actors and the rewarders."""
    aha = [python, "-m", "deploy.cli"]
    env = _part_env()
    learner = [*aha, "learner", "--config", str(config), *(["--resume"] if resume else [])]
    sup.start(Part("learner", learner, env, stop_order=0))
    for i in range(up.actors):
        actor = [*aha, "actor", "--config", str(config), "--actor-id", f"actor-{i}"]
        sup.start(Part(f"actor-{i}", actor, env, restart=up.restart, stop_order=1))
    for i in range(up.rewarders):
        rewarder = [*aha, "rewarder", "--config", str(config)]
        sup.start(Part(f"rewarder-{i}", rewarder, env, restart=up.restart, stop_order=2))


async def _setup_streams(bus_config) -> None:
    from protocol.bus import Bus

    bus = await Bus.connect(bus_config.model_copy(update={"setup_streams": True}), name="aha-up")
    await bus.close()


# -- the command ------------------------------------------------------------------------------


@contextlib.contextmanager
def nats_server(
    run_dir: Path, url: str | None = None, max_payload: int = 8 << 20
) -> Iterator[tuple[str, Any]]:
    """`url` (the config's `[bus] url`), else `NATS_URL` (the order `BusConfig` reads them
    in), else an embedded server for the run (stopped at the end; its store in the run
    folder, so a resumed run finds its queues as they were). Yields the URL and the embedded
    server (None for another)."""
    from protocol.server import NatsServer

    if url or os.environ.get("NATS_URL"):
        yield url or os.environ.get("NATS_URL"), None
        return
    with NatsServer(run_dir / "nats", max_payload=max_payload) as server:
        yield server.url, server


EVALUATION_FIELDS = {
    "accuracy": "accuracy",
    "pass_at_1": "pass_at_1",
    "length": "mean_length",
    "thinking_share": "thinking_share",
}
"""Summary key (`<key>_before`, `<key>_after`) -> field of `pipeline.heldout.Evaluation`."""
DONE_FIELDS = ("tasks_issued", *(o.key for o in Outcome), "steps_nonfinite")
"""The learner's `done` line's counts, copied into the summary."""


@dataclass
class LoopResult:
    ended: str
    exit_codes: dict[str, int]
    restarts: dict[str, int]
    seconds: float
    in_flight: int | None
    metrics: MetricsTail


def run_loop(
    up: UpConfig, learner, run_dir: Path, config: Path, bus_config, started: float, server=None
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
        resume = up.resume and has_checkpoint(config)
        start_parts(up, sup, config, sys.executable, resume)
        watching = watch(
            sup,
            metrics,
            bus_config,
            max_steps=learner.max_steps,
            stall_after_s=up.stall_after_s,
            started=started,
        )
        ended, learner_code = asyncio.run(watching)
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


def has_checkpoint(config: Path) -> bool:
    """Whether the learner of the run config `config` has a checkpoint to resume from."""
    from learner.config import LearnerConfig
    from learner.loop import has_checkpoint

    return has_checkpoint(load_config(LearnerConfig, config, section="learner"))


def summarize(learner, run_dir: Path, loop: LoopResult, before, after, started: float) -> dict:
    """What the run did, as `summary.json` holds it (and `--json` prints)."""
    from pipeline.plots import plot_curves

    # A resumed learner may redo the steps after its last checkpoint: the latest line counts.
    steps = sorted({r["step"]: r for r in loop.metrics.steps}.values(), key=lambda r: r["step"])
    done = next((r for r in reversed(loop.metrics.rows) if r.get("event") == "done"), {})
    final = run_dir / "final"

    def of(result, field: str):
        return getattr(result, field) if result else None

    return {
        "name": run_dir.name,
        "ended": loop.ended,
        "exit_codes": loop.exit_codes,
        "restarts": loop.restarts,
        **{
            f"{key}_{when}": of(result, field)
            for key, field in EVALUATION_FIELDS.items()
            for when, result in (("before", before), ("after", after))
        },
        "steps": len(steps),
        "wall_seconds": round(time.monotonic() - started, 1),
        "rl_seconds": round(loop.seconds, 1),
        **{key: done.get(key) for key in DONE_FIELDS},
        "groups_in_flight_at_stop": loop.in_flight,
        "policy_versions_trained_on": sorted(
            {v for r in steps for v in r.get("policy_versions", [])}
        ),
        "max_staleness_trained": max((r.get("staleness_max", 0) for r in steps), default=None),
        "max_staleness_bound": learner.max_staleness,
        "final_model": str(final) if (final / "config.json").exists() else None,
        "plot": str(plot_curves(steps, run_dir / "curves.png", loop.metrics.rows) or ""),
        "run_dir": str(run_dir),
    }


def prepare(up: UpConfig, learner, run_dir: Path) -> tuple[Path, list[dict], Path]:
    """The prompts, the held-out set (the demo's; none for a dataset) and the model to train:
    `--model`, else the demo's cold start (reused when a resumed run has it complete)."""
    from pipeline.coldstart import cold_start_model, complete, demo_data

    if up.dataset is None:
        n = max(4 * learner.max_steps * learner.batch, 2000)
        dataset, held_out = demo_data(
            run_dir, eval_problems=up.eval_problems, rl_problems=n, seed=up.seed
        )
    else:
        dataset, held_out = Path(up.dataset), []
    if up.model:
        return dataset, held_out, Path(up.model)
    steps = 0 if complete(run_dir) else up.cold_start_steps  # nothing to show when reused
    with progress_bar("cold start (SFT)", steps) as advance:
        model = cold_start_model(
            run_dir,
            held_out,
            steps=up.cold_start_steps,
            recipe=up.cold_start_recipe,
            seed=up.seed,
            env=_part_env(),
            on_step=lambda step: advance(completed=step),
        )
    return dataset, held_out, model


def evaluate(model: Path, held_out: list[dict], up: UpConfig, learner, run_dir: Path, when: str):
    """Held-out accuracy and pass@1 of `model` (None without a held-out set or a model).

    Kept in `heldout-<when>.json`: a resumed run does not evaluate its starting model again.
    """
    from pipeline.heldout import Evaluation, held_out_accuracy

    saved = run_dir / f"heldout-{when}.json"
    if when == "before" and up.resume and saved.exists():
        return Evaluation(**json.loads(saved.read_text()))
    work = len(held_out) * (1 + up.eval_samples)
    with progress_bar(f"held-out evaluation ({when})", work if held_out else None) as advance:
        result = held_out_accuracy(
            model,
            held_out,
            max_tokens=learner.dataset.max_tokens,
            samples=up.eval_samples,
            on_done=lambda n: advance(advance=n),
        )
    if result:
        log.info(f"accuracy {when}", **result.as_dict())
        saved.write_text(json.dumps(result.as_dict()) + "\n")
    return result


def run(up: UpConfig, learner, parts: dict[str, Any], *, json_out: bool) -> dict:
    """The run, step by step; returns (and writes) its summary.

    `learner` is the `[learner]` section as the parts will load it (preflight's), `parts`
    the user's sections and flags.
    """
    from protocol.log import setup_logging

    setup_logging("up")
    log_above_the_table()
    # SIGTERM (`timeout`, a service manager) as Ctrl-C: the parts stopped in order, a summary.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    run_dir = Path(up.runs_dir).resolve() / up.name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # Sized for the configured groups (NATS's default of 1 MiB is too small for long ones).
    max_payload = payload_limit(learner.dataset.group_size, learner.dataset.max_tokens)
    with nats_server(run_dir, (parts.get("bus") or {}).get("url"), max_payload) as (url, server):
        bus_config = load_config(BusConfig, overrides={**(parts.get("bus") or {}), "url": url})
        asyncio.run(_setup_streams(bus_config))
        log.info("run", dir=str(run_dir), nats=url, resume=up.resume)
        dataset, held_out, model = prepare(up, learner, run_dir)
        before = evaluate(model, held_out, up, learner, run_dir, "before")
        config = write_run_config(up, run_dir, model, dataset, url, parts)
        loop = run_loop(up, learner, run_dir, config, bus_config, started, server)
    after = evaluate(run_dir / "final", held_out, up, learner, run_dir, "after")
    summary = summarize(learner, run_dir, loop, before, after, started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, stderr=json_out)  # with --json, stdout holds only the JSON
    if json_out:
        print(json.dumps(summary), flush=True)
    return summary


def main(args: argparse.Namespace) -> int:
    """`aha up`: the options from `--config`'s `[up]`, the flags and `--set`, every input
    checked, then the run."""
    from deploy.preflight import check_up, resumed_name

    overrides = nest(  # the flags given (None: not given)
        {
            "model": args.model,
            "dataset": args.dataset,
            "actors": args.actors,
            "rewarders": args.rewarders,
            "name": args.name,
            "seed": args.seed,
            "engine": args.engine,
            "cold_start_steps": args.cold_start_steps,
            "resume": args.resume or None,
        }
    )
    sets = getattr(args, "set", None) or []
    up = load_config(
        UpConfig, args.config, section="up", overrides=overrides, sets=sets_in(sets, "up")
    )
    name = resumed_name(up) if up.resume else up.name or time.strftime("%Y%m%d-%H%M%S")
    up = up.model_copy(update={"name": name})
    learner = check_up(up, args.config, sets, learner_flags(args))  # before anything starts
    parts = read_parts(args.config, sets, learner_flags(args))
    external = (parts.get("bus") or {}).get("url") or os.environ.get("NATS_URL")
    if not external and (up.actors == 0 or up.rewarders == 0):
        raise ConfigError(
            "up.actors, up.rewarders: 0 uses those of an external bus ([bus] url or NATS_URL); "
            "the embedded server has none"
        )
    summary = run(up, learner, parts, json_out=args.json)
    return 0 if summary["ended"] == "finished" else 1
