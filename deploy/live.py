"""What `aha up` shows while the loop runs: the learner's steps as a live table (a log line
per step off a terminal), queue depth, stalls, and parts that exit, in words."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import structlog

from deploy.supervisor import SERVER, Exit, Supervisor
from learner.outcomes import ISSUED, Outcome

log = structlog.get_logger("deploy.up")

COLUMNS = ("step", "version", "reward", "accuracy", "length", "staleness", "kl", "tok/s")


class CurrentStderr:
    """A structlog logger writing to whatever `sys.stderr` is when it writes: under the live
    table rich swaps in a proxy that prints above the table, so `aha up`'s own log lines do
    not tear through it (structlog's PrintLogger keeps the stream it was made with)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg


def log_above_the_table() -> None:
    """Send this process's structlog lines through `CurrentStderr` (after `setup_logging`)."""
    structlog.configure(logger_factory=lambda *args: CurrentStderr())


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


def render(max_steps: int | None, steps: list[dict], depth, elapsed: float, stalls=None):
    """The last steps as a table; queue depth and stalled stages in its caption."""
    from rich.table import Table

    table = Table(title=f"aha up — {elapsed:.0f}s", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in steps[-12:]:
        table.add_row(
            f"{row['step']}/{max_steps or '∞'}",
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


def readable(tail: str) -> str:
    """A part's log tail for a person: its JSON lines as `time level event key=value`."""
    out = []
    for line in tail.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            out.append(f"  {line}")
            continue
        when = str(row.pop("timestamp", ""))[11:19]
        level, event = row.pop("level", ""), row.pop("event", "")
        row.pop("process", None)
        fields = " ".join(f"{k}={v}" for k, v in row.items())
        out.append(f"  {when} {level:<7} {event} {fields}".rstrip())
    return "\n".join(out)


def report_exit(console, ex: Exit) -> tuple[str, int | None] | None:
    """Say that a part exited (with its last log lines when it failed); return why the run
    ends and the learner's exit code if it does."""
    from rich.markup import escape

    if ex.name == "learner" and ex.returncode == 0:
        return "finished", 0
    again = " (restarting)" if ex.restarted else ""
    console.print(f"[red]{ex.name} exited with {ex.returncode}{again}[/]")
    console.print(escape(readable(ex.log_tail)), highlight=False, soft_wrap=True)
    if ex.name == "learner":
        return f"learner exited with {ex.returncode}", ex.returncode
    if ex.name == SERVER and not ex.restarted:
        return "nats-server died and could not be restarted", None
    return None


async def connect(bus_config, timeout: float = 30.0):
    from protocol.bus import Bus

    # Bounded: connecting retries forever, and a server that is gone must not hang the run.
    return await asyncio.wait_for(Bus.connect(bus_config, name="aha-up", setup=False), timeout)


async def read_depth(bus):
    """`queue_depth` now, None if the server does not answer (it may be restarting)."""
    from protocol.depth import queue_depth

    try:
        return await queue_depth(bus.js)
    except Exception as e:  # a view must not end the run
        log.warning("queue depth unavailable", error=repr(e))
        return None


async def watch(
    sup: Supervisor,
    metrics: MetricsTail,
    bus_config,
    *,
    max_steps: int | None,
    stall_after_s: float,
    started: float,
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
    bus = await connect(bus_config)
    stalled = StallWatch(stall_after_s)
    reported = 0
    with live or contextlib.nullcontext():
        try:
            while True:
                for ex in sup.poll():
                    if ended := report_exit(console, ex):
                        return ended
                metrics.read()
                steps = metrics.steps
                reading = await read_depth(bus)
                stalls = stalled.update(reading) if reading else {}
                depth = {k: v.as_dict() for k, v in reading.items()} if reading else None
                if live:
                    elapsed = time.monotonic() - started
                    live.update(render(max_steps, steps, depth, elapsed, stalls), refresh=True)
                else:
                    for row in steps[reported:]:
                        keys = ("step", "version", "reward", "accuracy", "response_length")
                        log.info("step", **{k: row[k] for k in keys if k in row})
                    reported = len(steps)
                await asyncio.sleep(1.0)
        finally:
            await bus.close()


async def in_flight(bus_config) -> int | None:
    """Tasks still somewhere in the loop: messages left in the three work queues (None,
    logged, when the server cannot be reached)."""
    try:
        bus = await connect(bus_config)
    except Exception as e:
        log.error("in-flight count unavailable: no server", error=repr(e))
        return None
    try:
        depth = await read_depth(bus)
    finally:
        await bus.close()
    if depth is None:
        return None
    return sum(depth[s].messages for s in ("tasks", "rollouts", "scored"))


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """A progress bar (done/total, rate, time left) on a terminal for work of `total` units;
    yields `update(completed=…, advance=…)`. Off a terminal, or with nothing to do, a no-op:
    logs stay JSON lines."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not total or not console.is_terminal:
        yield lambda **_: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total, rate="")

        def update(**change) -> None:
            progress.update(task, **change)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f}/s" if speed else "")

        yield update


def print_summary(summary: dict, *, stderr: bool = False) -> None:
    """The run in a few lines a person reads: how it ended, held-out figures before → after,
    what became of the groups, and where the run, its plot and its model are."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=True)  # paths stay whole
    ok = summary["ended"] == "finished"
    head = "finished" if ok else f"ended: {summary['ended']}"
    console.print(
        f"[bold]aha up {head}[/]: {summary['steps']} steps in "
        f"{_duration(summary['wall_seconds'])} (RL {_duration(summary['rl_seconds'])})"
    )
    for label, key, fmt in (
        ("held-out accuracy", "accuracy", "{:.3f}"),
        ("pass@1", "pass_at_1", "{:.3f}"),
        ("length (tokens)", "length", "{:.1f}"),
    ):
        before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if before is not None or after is not None:
            shown = [fmt.format(v) if v is not None else "—" for v in (before, after)]
            console.print(f"  {label:<18} {shown[0]} → {shown[1]}")
    if summary.get(Outcome.TRAINED.key) is not None:
        counts = [
            f"{summary.get(o.key) or 0} {o.label}"
            for o in ISSUED
            if o == Outcome.TRAINED or summary.get(o.key)
        ]
        counts.append(f"{summary['groups_in_flight_at_stop']} in flight")
        console.print(f"  {'groups':<18} {', '.join(counts)}")
    run_dir = Path(summary["run_dir"])
    console.print(f"  {'run':<18} {_shown(run_dir)}/ (summary.json, logs/)")
    for label, key in (("plot", "plot"), ("model", "final_model")):
        if summary.get(key):
            console.print(f"  {label:<18} {_shown(Path(summary[key]))}")


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{s}s"
