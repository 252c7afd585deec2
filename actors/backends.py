"""The engine backends by name: the one place that imports `VllmEngine` and `HfEngine`.

Each backend imports its heavy library (vLLM, transformers) only when it is started.
"""

from __future__ import annotations

from pathlib import Path

from actors.engine import Backend, Engine


async def setup_engine(backend: Backend, model: str | Path, **kwargs) -> Engine:
    """Start the `backend` engine on the HF folder `model` (keyword arguments go to its class)."""
    if backend == "vllm":
        from actors.vllm_engine import VllmEngine

        return await VllmEngine.start(model, **kwargs)
    if backend == "hf":
        from actors.hf_engine import HfEngine

        return HfEngine(model, **kwargs)
    raise ValueError(f"unknown engine backend {backend!r} (expected 'vllm' or 'hf')")
