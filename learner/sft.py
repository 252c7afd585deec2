"""Supervised fine-tuning on prompt/response pairs with the GRPO learner's engine.

R1's cold start and its distillation stage both train on (prompt, response) pairs with the
loss on the response tokens only. The batch layout is the RL one (prompt left-padded,
response right-padded, `learner.logprobs.completion_logprobs`), so prompt tokens are never
scored: their log-probs are not even computed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import structlog
import torch

from learner.dispatcher import read_rows
from learner.engine import PolicyEngine, rank_micro_batches
from learner.grpo import aggregate, aggregate_share
from learner.logprobs import completion_logprobs, pad_batch

log = structlog.get_logger("learner.sft")

Example = tuple[list[int], list[int]]
"""(prompt token ids, response token ids)."""


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per response token, averaged over every token of the batch.

    `logp[N, T]` are the response tokens' log-probs, `mask[N, T]` 1 on real response tokens.
    """
    return -aggregate(logp, mask, "token-mean")  # []


def read_pairs(
    path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
) -> list[tuple[str, str]]:
    """(prompt, response) texts from a JSONL file, one object per line."""
    return [
        (prompt, str(response))
        for prompt, response in read_rows(path, prompt_field, response_field)
    ]


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Example]:
    """Prompt encoded as the tokenizer does for generation; response + EOS, no special tokens added."""
    examples = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        examples.append((list(prompt_ids), list(response_ids)))
    return examples


def sft_step(pe: PolicyEngine, examples: Sequence[Example], pad_id: int = 0) -> dict[str, float]:
    """One optimizer step on `examples` (every rank passes the same list); returns loss and tokens."""
    padded = pad_batch([p for p, _ in examples], [r for _, r in examples], pad_id)
    prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(pe.device) for t in padded)
    micro_batch = pe.config.deepspeed.micro_batch
    own = rank_micro_batches(len(examples), micro_batch, pe.rank, pe.world_size)
    filler = next((s for s in own if s is not None), slice(0, micro_batch))
    pe.engine.train()
    totals = torch.zeros(2, dtype=torch.float64, device=pe.device)
    for rows in own:
        real = rows is not None
        rows = rows or filler
        mask = completion_mask[rows]  # [n, T]
        logp = completion_logprobs(
            pe.engine, prompt_ids[rows], completion_ids[rows], 1.0, prompt_mask[rows], mask
        )  # [n, T]
        loss = sft_loss(logp, mask)
        share = aggregate_share(mask, completion_mask, "token-mean") if real else 0.0
        pe.engine.backward(loss * (share * pe.world_size), scale_wrt_gas=False)
        totals += torch.stack([share * loss.detach(), mask.sum().float() * float(real)]).double()
    pe.engine.step()
    if torch.distributed.is_initialized() and pe.world_size > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return {"loss": loss_sum, "tokens": tokens, "lr": float(pe.engine.get_lr()[0])}


def train_sft(
    pe: PolicyEngine,
    examples: Sequence[Example],
    *,
    steps: int,
    batch: int,
    pad_id: int = 0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """`steps` optimizer steps of `batch` examples each, reshuffling (seeded) at every pass."""
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    for step in range(steps):
        chosen = []
        while len(chosen) < batch:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            chosen.append(examples[order.pop()])
        metrics = sft_step(pe, chosen, pad_id)
        history.append(metrics)
        if pe.rank == 0:
            log.info("sft step", step=step + 1, **{k: round(v, 6) for k, v in metrics.items()})
    return history
