"""`aha top`: queue depth per stage — live, once as JSON, or as Prometheus gauges."""

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
from protocol.depth import FIELDS, Depth, export_depth, queue_depth
from protocol.log import setup_logging
from protocol.stage import stop_on_signals


def render(depth: dict[str, Depth]) -> Table:
    table = Table(title="aha queue depth", title_justify="left")
    table.add_column("stage")
    for f in FIELDS:
        table.add_column(f.replace("_", " "), justify="right")
    for stage, d in depth.items():
        table.add_row(stage, *(f"{getattr(d, f):,}" for f in FIELDS))
    return table


async def run(args: argparse.Namespace, config: BusConfig) -> int:
    bus = await Bus.connect(config, name="aha-top")
    try:
        if args.once:
            depth = await queue_depth(bus.js)
            if args.json:
                print(json.dumps({k: v.as_dict() for k, v in depth.items()}), flush=True)
            else:
                Console().print(render(depth))
            return 0
        if args.prometheus:
            from prometheus_client import start_http_server

            start_http_server(args.prometheus)
        stop = stop_on_signals()
        live = None if args.json or not sys.stdout.isatty() else Live(auto_refresh=False)
        if live:
            live.start()
        try:
            while not stop.is_set():
                depth = await queue_depth(bus.js)
                export_depth(depth)
                if live:
                    live.update(render(depth), refresh=True)
                elif args.json:
                    print(json.dumps({k: v.as_dict() for k, v in depth.items()}), flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=args.interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            if live:
                live.stop()
        return 0
    finally:
        await bus.close()


def main(args: argparse.Namespace, config: BusConfig) -> int:
    setup_logging("top")
    return asyncio.run(run(args, config))
