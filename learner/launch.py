"""`aha learner` over several ranks and nodes: PyTorch's elastic launcher, started in-process.

A learner of `ranks` × `nodes` processes is started by `aha learner` itself: on each node it
runs `torch.distributed.launcher.api.elastic_launch`, which starts `ranks` copies of the same
`aha learner` command as workers; they see `TORCHELASTIC_RUN_ID` and train (global rank 0
runs the loop, the others follow it; module `learner.ranks`). Nodes meet through torch's static
rendezvous: node 0 hosts a c10d TCPStore at `learner.rendezvous`, the others dial it, and node
`n`'s ranks are `n·ranks … n·ranks + ranks − 1` on every start.

No restarts: a rank that dies stops the whole learner (the launcher stops the others), it
exits 1 with one line naming the rank, and the next start resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import structlog

from learner.config import LearnerConfig
from protocol.config import ConfigError

log = structlog.get_logger("learner")

WORKER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
"""Set in a process some launcher started as one rank: it trains instead of launching."""


def is_worker() -> bool:
    return any(key in os.environ for key in WORKER_ENV)


def local_ranks(config: LearnerConfig) -> int:
    """`learner.ranks`, else one per visible GPU, else 1."""
    if config.ranks is not None:
        return config.ranks
    import torch

    return max(1, torch.cuda.device_count())


def node_rank(config: LearnerConfig) -> int:
    """`learner.node_rank`, else the ordinal a StatefulSet puts at the end of the host name."""
    if config.node_rank is not None:
        return config.node_rank
    if config.nodes == 1:
        return 0
    host = socket.gethostname()
    ordinal = host.rpartition("-")[2]
    if not ordinal.isdigit() or int(ordinal) >= config.nodes:
        raise ConfigError(
            f"learner.node_rank: not set, and host name {host!r} does not end in -N "
            f"with N below nodes = {config.nodes}"
        )
    return int(ordinal)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `aha learner` command line each rank runs (the same flags as this one)."""
    argv = ["-m", "deploy.cli", "learner", "--config", str(args.config)]
    if args.resume:
        argv.append("--resume")
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.nats_url:
        argv += ["--nats-url", args.nats_url]
    return argv


def launch(config: LearnerConfig, args: argparse.Namespace) -> int:
    """Start this node's ranks and wait for the whole learner; returns the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from learner.loop import has_checkpoint, load_tokenizer

    # Bad input is one line here, not the same error from every rank.
    if args.resume and not has_checkpoint(config):
        raise ConfigError(f"--resume: no checkpoint in {config.checkpoint_dir}")
    load_tokenizer(config)  # learner.dataset is there (and the tokenizer loads)
    ranks, node = local_ranks(config), node_rank(config)
    endpoint = config.rendezvous if config.nodes > 1 else f"127.0.0.1:{_free_port()}"
    launch_config = LaunchConfig(
        min_nodes=config.nodes,
        max_nodes=config.nodes,
        nproc_per_node=ranks,
        run_id="aha-learner",
        rdzv_backend="static",  # node ranks as configured: pod n always holds the same ranks
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": node, "timeout": int(config.rendezvous_timeout_s)},
        max_restarts=0,  # a rank that dies stops the learner; the next start resumes
        monitor_interval=0.5,
        start_method="spawn",
        shutdown_timeout=int(config.stop_timeout_s),
    )
    log.info(
        "starting learner ranks",
        ranks=ranks,
        nodes=config.nodes,
        node_rank=node,
        world_size=ranks * config.nodes,
        rendezvous=endpoint,
    )
    try:
        elastic_launch(launch_config, sys.executable)(*worker_argv(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (
            f"killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exit {failure.exitcode}"
        )
        log.error(
            f"learner rank {rank} failed ({how}): all ranks stopped; "
            "the next start resumes from the last checkpoint",
            rank=rank,
            node_rank=node,
            exitcode=failure.exitcode,
        )
        return 1
    except SignalException as e:  # the ranks got the signal too: rank 0 checkpointed and stopped
        log.info("learner ranks stopped", signal=signal.Signals(e.sigval).name)
        return 0
    log.info("learner ranks finished", ranks=ranks, node_rank=node)
    return 0
