"""`RewarderConfig`: the `[rewarder]` section of an aha config file."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, Field, field_validator

from protocol.config import CONFIG, BusConfig
from rewarder.sandbox import SandboxConfig


class RewarderConfig(BaseModel):
    """Everything `aha rewarder` needs; `load_config(RewarderConfig, path, section="rewarder")`."""

    model_config = CONFIG

    workers: int = Field(2, ge=1)
    """Verifier processes; the completions of a group are scored on all of them at once."""
    timeout_s: float = Field(30.0, gt=0)
    """Hard limit per completion: past it the worker is killed and the completion gets no reward."""
    concurrency: int = Field(2, ge=1)
    """Rollouts leased at once: one scores while the next is fetched and the last published."""
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    """Limits for programs run by `code_tests`."""
    rewarder_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Name in each `ScoredRollout` and in the logs."""
    plugins: list[str] = Field(default_factory=list)
    """Plug-in rewards as `package.module:function` (a `(completion, reference, task) -> float`
    that raises `rewarder.errors.VerifierError` when it cannot decide), loaded at start by the
    rewarder and each verifier worker; tasks name them by that path in their `rewards`. One
    that does not import or take those arguments stops the rewarder at start."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port; None = do not serve."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """NATS connection and stream settings (the file's `[bus]` section)."""

    @field_validator("plugins")
    @classmethod
    def _plugins_load(cls, plugins: list[str]) -> list[str]:
        from rewarder.rewards import load_reward

        for path in plugins:
            load_reward(path)  # here, so a broken one is one line at start, before any work
        return plugins
