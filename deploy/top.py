"""`aha top`: queue depth per stage — live, once as JSON, or as Prometheus gauges.

Live (table or `--json` lines) it also reports stalls: a stage with work waiting and no
progress for `--stall-after` seconds is marked in the table and the JSON (`stalled_s`) and
logged as a warning (`protocol.depth.StallWatch`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table

from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.depth import (
    FIELDS,
    STALL_AFTER_S,
    Depth,
    Stall,
    StallWatch,
    export_depth,
    queue_depth,
)
from protocol.log import setup_logging
from protocol.stage import Stopped, stop_on_signals


def render(depth: dict[str, Depth], stalls: dict[str, Stall] | None = None) -> Table:
    stalls = stalls or {}
    table = Table(title="aha queue depth", title_justify="left")
    table.add_column("stage")
    for f in FIELDS:
        table.add_column(f.replace("_", " "), justify="right")
    table.add_column("stalled", justify="right")
    for stage, d in depth.items():
        stall = stalls.get(stage)
        table.add_row(
            stage,
            *(f"{getattr(d, f):,}" for f in FIELDS),
            f"[red]{stall.seconds:.0f}s[/]" if stall else "",
        )
    return table


def as_json(depth: dict[str, Depth], stalls: dict[str, Stall] | None = None) -> str:
    """One JSON object keyed by stage; a stalled stage also has `stalled_s`."""
    out = {k: v.as_dict() for k, v in depth.items()}
    for stage, stall in (stalls or {}).items():
        out[stage]["stalled_s"] = stall.seconds
    return json.dumps(out)


async def run(args: argparse.Namespace, config: BusConfig) -> int:
    stop = stop_on_signals()
    bus = await Bus.connect(config, name="aha-top")
    try:
        if args.once:
            depth = await queue_depth(bus.js)
            if args.json:
                print(as_json(depth), flush=True)
            else:
                Console().print(render(depth))
            return 0
        if args.prometheus:
            from prometheus_client import start_http_server

            start_http_server(args.prometheus)
        watch = StallWatch(getattr(args, "stall_after", None) or STALL_AFTER_S)
        live = None if args.json or not sys.stdout.isatty() else Live(auto_refresh=False)
        if live:
            live.start()
        try:
            while not stop.is_set():
                depth = await queue_depth(bus.js)
                stalls = watch.update(depth)
                export_depth(depth)
                if live:
                    live.update(render(depth, stalls), refresh=True)
                elif args.json:
                    print(as_json(depth, stalls), flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=args.interval)
                except TimeoutError:
                    pass
        finally:
            if live:
                live.stop()
        return 0
    finally:
        await bus.close()


def main(args: argparse.Namespace, config: BusConfig) -> int:
    setup_logging("top")
    try:
        return asyncio.run(run(args, config))
    except Stopped:  # top holds nothing: a signal ends it at once
        return 0
