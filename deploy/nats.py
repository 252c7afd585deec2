"""`aha nats`: an embedded NATS server with aha's streams, in the foreground.

The first line of standard output is `NATS_URL=nats://127.0.0.1:PORT`, so a script can
`eval` it or read it from a pipe; logs go to standard error.
"""

from __future__ import annotations

import argparse
import asyncio

from protocol.bus import Bus
from protocol.config import BusConfig, ConfigError
from protocol.log import setup_logging
from protocol.server import NatsServer
from protocol.stage import stop_on_signals


async def run(server: NatsServer, config: BusConfig) -> None:
    stop = stop_on_signals()  # before the URL line: whoever reads it may signal at once
    bus = await Bus.connect(config, name="aha-nats", url=server.url)
    await bus.close()
    print(f"NATS_URL={server.url}", flush=True)
    await stop.wait()


def main(args: argparse.Namespace, config: BusConfig) -> int:
    if config.replicas > 1:  # JetStream refuses it on one server, after the server started
        raise ConfigError(f"bus.replicas: {config.replicas}, but the embedded server is one node")
    setup_logging("nats")
    server = NatsServer(
        args.store,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        config_file=args.server_config,
    )
    with server:
        asyncio.run(run(server, config))
    return 0
