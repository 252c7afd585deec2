"""Per-token log-probabilities of completions, the same way the actors sample them.

An actor samples token `y_t` from `softmax(logits_t / temperature)` and reports
`log μ(y_t)` of that tempered distribution (vLLM: `logprobs_mode="processed_logprobs"`;
HF `generate`: `log_softmax` of `output_scores`). The learner recomputes `log π_θ(y_t)` here
from its own logits with the same temperature, in fp32, so ratios and importance weights
compare like with like.

Layout of a batch: prompts left-padded to `P`, completions right-padded to `T`, so every
completion starts at column `P` and the logits at columns `P-1 … P+T-2` predict it. Position
ids come from the attention mask, so a padded row computes the same numbers as the unpadded
sequence (as HF `generate` and vLLM do).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """`log softmax(logits / temperature)` gathered at `targets`, computed in fp32.

    Shapes: `logits [N, T, V]`, `targets [N, T]` (int) -> `[N, T]` float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    logits = logits.float()  # [N, T, V]
    if temperature != 1.0:
        logits = logits / temperature  # [N, T, V]
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked - torch.logsumexp(logits, dim=-1)  # [N, T]


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    temperature: float = 1.0,
    prompt_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs `log π(y_t | x, y_<t)` of each completion token under `model` at `temperature`.

    Args:
        model: an HF causal LM (or a DeepSpeed engine wrapping one) returning `.logits`.
        prompt_ids: `[N, P]` int, prompts **left**-padded (real tokens end at column `P-1`).
        completion_ids: `[N, T]` int, completions **right**-padded (real tokens start at column 0).
        temperature: the sampling temperature (> 0); logits are divided by it.
        prompt_mask: `[N, P]`, 1 on real prompt tokens, 0 on padding; None = no padding.
        completion_mask: `[N, T]`, 1 on real completion tokens; None = no padding.

    Returns:
        `[N, T]` float32: the log-prob of `completion_ids[n, t]`, 0 where `completion_mask` is 0.
        Gradients flow when called outside `torch.no_grad()`.

    `pad_batch` builds these tensors from lists of token ids.
    """
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)  # [N, P]
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)  # [N, T]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()  # [N, P+T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [N, P+T]
    kwargs = {"logits_to_keep": T + 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )
    logits = out.logits[:, -(T + 1) : -1]  # [N, T, V]  column P-1+t predicts completion token t
    logp = token_logprobs(logits, completion_ids, temperature)  # [N, T]
    return logp * completion_mask.to(logp.dtype)  # [N, T]


def pad_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lists of token ids -> `(prompt_ids [N, P], prompt_mask, completion_ids [N, T], completion_mask)`.

    Prompts are left-padded and completions right-padded with `pad_id`, as
    `completion_logprobs` expects. One prompt per completion (repeat a group's prompt G times).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    N = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max((len(c) for c in completions), default=1))
    prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)  # [N, P]
    prompt_mask = torch.zeros((N, P), dtype=torch.long)  # [N, P]
    completion_ids = torch.full((N, T), pad_id, dtype=torch.long)  # [N, T]
    completion_mask = torch.zeros((N, T), dtype=torch.long)  # [N, T]
    for n, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p):
            prompt_ids[n, P - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            prompt_mask[n, P - len(p) :] = 1
        if len(c):
            completion_ids[n, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            completion_mask[n, : len(c)] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask
