"""`RewarderConfig`: the `[rewarder]` section of an aha config file."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, Field

from protocol.config import CONFIG, BusConfig
from rewarder.sandbox import SandboxLimits


class RewarderConfig(BaseModel):
    """Everything `aha rewarder` needs; `load_config(RewarderConfig, path, section="rewarder")`."""

    model_config = CONFIG

    workers: int = Field(2, ge=1)
    """Verifier processes; the completions of a group are scored on all of them at once."""
    timeout_s: float = Field(30.0, gt=0)
    """Hard limit per completion: past it the worker is killed and the completion gets no reward."""
    concurrency: int = Field(2, ge=1)
    """Rollouts leased at once: one scores while the next is fetched and the last published."""
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits)
    """Limits for programs run by `code_tests`."""
    rewarder_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Name in each `ScoredRollout` and in the logs."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port; None = do not serve."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """NATS connection and stream settings (the file's `[bus]` section)."""
