"""Several learner ranks under `torchrun`: rank 0 does all bus work, every rank trains.

Rank 0 runs the loop (`learner.loop`). Whenever it reaches work that needs every rank — an
update, a checkpoint, gathering the weights — it broadcasts the operation and its arguments
(the `PolicyBatch` for an update), then runs it itself; the other ranks sit in `follow`,
running whatever they are told, until `stop`. With one rank nothing is broadcast.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import structlog
import torch

from learner.engine import PolicyEngine, save_checkpoint, train_step
from learner.weights import export_model, write_shards

log = structlog.get_logger("learner.ranks")


def _write_shards(pe: PolicyEngine, directory, dtype: str, shard_mb: float, shared: bool):
    return write_shards(pe.module, directory, dtype, shard_mb, rank=pe.rank, shared=shared)


def _export(pe: PolicyEngine, directory, dtype: str, shard_mb: float, tokenizer_from):
    return export_model(
        pe.module, directory, dtype, shard_mb, rank=pe.rank, tokenizer_from=tokenizer_from
    )


OPS: dict[str, Callable[..., Any]] = {
    "train": train_step,
    "checkpoint": save_checkpoint,
    "write_shards": _write_shards,
    "export": _export,
    "noop": lambda pe: None,  # keeps the followers' broadcast from timing out while rank 0 waits
}


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def collective(pe: PolicyEngine, op: str, *args) -> Any:
    """On rank 0: have every rank run `op(pe, *args)`; returns rank 0's result."""
    if world_size() > 1:
        torch.distributed.broadcast_object_list([(op, args)], src=0)
    return OPS[op](pe, *args)


def stop_followers() -> None:
    if world_size() > 1:
        torch.distributed.broadcast_object_list([("stop", ())], src=0)


def follow(pe: PolicyEngine) -> int:
    """On ranks > 0: run what rank 0 broadcasts until it says `stop`.

    Signals are left to rank 0 (torchrun delivers them to every rank): a follower that died
    on SIGTERM would leave rank 0 hanging in its next collective.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    log.info("following rank 0", rank=pe.rank)
    while True:
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            return 0
        OPS[op](pe, *args)
