"""Samples from a model folder in this process (the HF reference engine), scored in the
verifier pool, written as a samples file (`pipeline.samples`).

The bus is the way to sample at scale (`pipeline.generate`: actors and rewarders, resumable);
this is the small, dependency-free path the demo recipe and tests use for a 160k-parameter
model, where starting a NATS server, an actor and a rewarder costs more than the sampling.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, Field

from protocol.config import CONFIG
from protocol.messages import Sampling


class PromptSettings(BaseModel):
    """How a prompt file's rows become problems (`{id?, prompt, answer}` by default) and how
    their samples are scored."""

    model_config = CONFIG

    prompt_field: str = "prompt"
    """The field with the prompt text (given to the model as it is)."""
    answer_field: str = "answer"
    """The field with the reference the rewards compare with."""
    rewards: dict[str, float] = Field(default_factory=lambda: {"accuracy_gsm8k": 1.0})
    """Reward name -> weight, scored for every sample."""
    answer_tag: bool = True
    """Tasks ask for `<answer>…</answer>` (`meta.answer_tag`)."""


def sample_locally(
    model: str | Path,
    problems: list[dict[str, Any]],  # {id, prompt, reference}: `pipeline.generate.read_prompt_file`
    out: str | Path,
    *,
    k: int,
    sampling: Sampling,
    settings: PromptSettings,
    batch: int = 64,
    workers: int = 1,
) -> Path:
    """`k` samples of every problem from `model`, scored with `settings.rewards`, written to
    `out` (one line per problem) through a temporary file."""
    import torch

    from actors.hf_engine import HfEngine
    from rewarder.pool import Job, VerifierPool

    torch.set_num_threads(1)
    engine = HfEngine(model)
    ids = [engine.tokenizer(p["prompt"])["input_ids"] for p in problems]

    async def generate():
        groups = []
        for i in range(0, len(ids), batch):
            groups += await engine.generate_batch(ids[i : i + batch], sampling, k)
        return groups

    groups = asyncio.run(generate())
    task = SimpleNamespace(meta={"answer_tag": settings.answer_tag})
    jobs = [
        Job(s.text, p["reference"], settings.rewards, task)
        for p, g in zip(problems, groups, strict=True)
        for s in g.samples
    ]
    with VerifierPool(workers=workers) as pool:
        scores = iter(pool.map(jobs))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for problem, group in zip(problems, groups, strict=True):
            samples = []
            for s in group.samples:
                score = next(scores)
                samples.append(
                    {
                        "text": s.text,
                        "n_tokens": len(s.token_ids),
                        "finish_reason": s.finish_reason,
                        "reward": score.reward,
                        "components": score.components,
                        "error": score.error,
                        "policy_version": group.policy_version,
                    }
                )
            f.write(json.dumps({**problem, "samples": samples}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out
