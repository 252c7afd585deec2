"""transformers backend of `actors.engine.Engine`: `generate` with a KV cache.

The small reference engine: for tests, for parity checks against vLLM, and for machines
without vLLM. One `generate` call per batch (prompts left-padded, each repeated G times),
run in a worker thread so the event loop stays free; calls are serialised.

Log-probs are `log_softmax` of `generate`'s `scores`, which are the logits after the
sampling warpers (temperature, top-k, top-p): the distribution actually sampled, as vLLM's
`processed_logprobs`. With temperature 0 (greedy) they are the untempered log-probs.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from actors.engine import Generation, weights_folder
from protocol.messages import Sample, Sampling

_loading = threading.Lock()
"""Neither transformers' lazy import nor `from_pretrained` is thread-safe (the model is built
under process-wide meta-device and default-dtype contexts): two engines loading in two
threads of one process (the pipeline's stages side by side) failed with "Cannot copy out of
meta tensor", or "cannot import name 'AutoModelForCausalLM'" on a first import."""


class HfEngine:
    """A transformers causal LM serving one model folder."""

    def __init__(
        self, model: str | Path, *, version: int = 0, dtype: str = "float32", device: str = "cpu"
    ):
        import torch

        self._torch = torch
        with _loading:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
            self.model.to(device).eval()
        self._device = device
        self._version = version
        self._lock = asyncio.Lock()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos_ids = {eos} if isinstance(eos, int) else set(eos)

    @property
    def version(self) -> int:
        return self._version

    async def generate(
        self, prompt_token_ids: Sequence[int], sampling: Sampling, n: int
    ) -> Generation:
        return (await self.generate_batch([prompt_token_ids], sampling, n))[0]

    async def generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int
    ) -> list[Generation]:
        async with self._lock:
            version = self._version
            started = time.perf_counter()
            groups = await asyncio.to_thread(self._generate, prompts, sampling, n)
            seconds = time.perf_counter() - started
        return [Generation(samples, version, seconds) for samples in groups]

    def _generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int
    ) -> list[list[Sample]]:
        torch = self._torch
        from transformers import GenerationConfig

        if not prompts:
            return []
        eos = min(self._eos_ids)
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        P = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), P), eos, dtype=torch.long)  # [B, P] left-padded
        attention_mask = torch.zeros((len(rows), P), dtype=torch.long)  # [B, P]
        for i, r in enumerate(rows):
            input_ids[i, P - len(r) :] = torch.tensor(r)
            attention_mask[i, P - len(r) :] = 1
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy or sampling.top_k < 0 else sampling.top_k,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=sorted(self._eos_ids),
            # Finished rows are filled with EOS, so the first EOS marks the end even when
            # the model samples the pad token as an ordinary token.
            pad_token_id=eos,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=attention_mask.to(self._device),
                generation_config=config,
            )
            completion = out.sequences[:, P:].cpu()  # [B, T]
            scores = torch.stack(out.scores, dim=1).float().cpu()  # [B, T, V] after warpers
            logp = scores.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # [B, T]
        samples = [self._sample(completion[i], logp[i], sampling) for i in range(len(rows))]
        return [samples[g * n : (g + 1) * n] for g in range(len(prompts))]

    def _sample(self, token_ids, logp, sampling: Sampling) -> Sample:
        ids = token_ids.tolist()
        end, reason = len(ids), "length"
        for t, tok in enumerate(ids):
            if tok in self._eos_ids:
                end, reason = t + 1, "stop"
                break
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        if sampling.stop:
            # Shortest prefix whose text contains a stop string (as vLLM, which keeps the
            # stop string's tokens and cuts the text before it).
            for t in range(1, end + 1):
                prefix = self.tokenizer.decode(ids[:t], skip_special_tokens=True)
                hits = [prefix.index(s) for s in sampling.stop if s in prefix]
                if hits:
                    end, reason, text = t, "stop", prefix[: min(hits)]
                    break
        return Sample(
            token_ids=np.asarray(ids[:end], dtype=np.int32),
            logprobs=logp[:end].numpy().astype(np.float32),
            text=text,
            finish_reason=reason,
        )

    async def load_weights(self, weights: str | Path | Sequence[str | Path], version: int) -> None:
        from safetensors.torch import load_file

        if isinstance(weights, (str, Path)):
            files = sorted(
                weights_folder(weights, Path(tempfile.gettempdir())).glob("*.safetensors")
            )
        else:
            files = [Path(f) for f in weights]

        def load() -> None:
            state = {}
            for f in files:
                state.update(load_file(str(f)))
            self._load_state(state)

        async with self._lock:
            # Off the event loop: a large model must not stall keep-alives and heartbeats.
            await asyncio.to_thread(load)
            self._version = version

    def _load_state(self, state: dict) -> None:
        expected = set(self.model.state_dict())
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = expected - set(state) - ({"lm_head.weight"} if tied else set())
        unexpected = set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        # Check every shape before copying anything, so a bad file leaves the model as it was.
        params = self.model.state_dict()
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}"
                )
        self.model.load_state_dict(state, strict=False)

    async def close(self) -> None:
        pass
