"""Held-out evaluation of a model folder: greedy accuracy, pass@1 of sampled completions, length.

Scored with the same rule-based reward the run trains on (`accuracy_gsm8k` for the demo), so
"accuracy" means the same thing before, during and after training.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.messages import Sampling


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    """Greedy accuracy over the held-out set."""
    pass_at_1: float | None
    """Mean accuracy of `samples` completions per problem at `temperature` and `top_p` (None if
    not run)."""
    mean_length: float
    """Mean greedy completion length, in tokens."""
    thinking_share: float
    """Share of greedy completions whose `<think>` block is not empty."""
    problems: int

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: str | Path,
    rows: list[dict],
    *,
    max_tokens: int = 64,
    samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch: int = 250,
    reward: str = "accuracy_gsm8k",
    on_done: Callable[[int], None] | None = None,
) -> Evaluation:
    """Generate with the HF reference engine and score every completion by `reward`.

    `on_done` is called with the number of completions each batch produced (of
    `len(rows) * (1 + samples)` in all).
    """
    import torch

    from actors.hf_engine import HfEngine
    from rewarder.rewards import REWARDS

    torch.set_num_threads(1)
    score = REWARDS[reward]
    engine = HfEngine(model)
    tokenizer = engine.tokenizer
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]

    async def run(sampling: Sampling, n: int):
        out = []
        for i in range(0, len(prompts), batch):
            out += await engine.generate_batch(prompts[i : i + batch], sampling, n)
            if on_done:
                on_done(len(prompts[i : i + batch]) * n)
        return out

    greedy = asyncio.run(run(Sampling(temperature=0.0, max_tokens=max_tokens), 1))
    correct, lengths, thinking = 0, 0, 0
    for row, gen in zip(rows, greedy, strict=True):
        sample = gen.samples[0]
        correct += score(sample.text, row["answer"]) == 1.0
        lengths += len(sample.token_ids)
        thinking += "<think></think>" not in sample.text and "<think>" in sample.text
    pass_at_1 = None
    if samples:
        sampled = asyncio.run(
            run(
                Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=0),
                samples,
            )
        )
        hits = sum(
            score(s.text, row["answer"]) == 1.0
            for row, gen in zip(rows, sampled, strict=True)
            for s in gen.samples
        )
        pass_at_1 = hits / (len(rows) * samples)
    n = len(rows)
    return Evaluation(correct / n, pass_at_1, lengths / n, thinking / n, n)


def held_out_accuracy(
    model: str | Path,
    rows: list[dict],
    *,
    max_tokens: int,
    samples: int,
    on_done: Callable[[int], None] | None = None,
) -> Evaluation | None:
    """`evaluate` for a run's model folder; None without a held-out set or without a model
    there (a run that ended before its final export)."""
    if not rows or not (Path(model) / "config.json").exists():
        return None
    return evaluate(model, rows, max_tokens=max_tokens, samples=samples, on_done=on_done)
