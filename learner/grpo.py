"""GRPO's equations as pure tensor functions (DESIGN.md, "GRPO" and "The off-policy bound").

One function per equation, named after the paper's symbols. Shapes: `N` completions, `T`
completion tokens (right-padded); `adv` is per completion and broadcast over its tokens;
`mask` is 1 on real completion tokens and 0 on padding.

Papers: GRPO — Shao et al. 2024, DeepSeekMath (arXiv:2402.03300); DeepSeek-R1 (arXiv:2501.12948);
k3 KL estimator — Schulman 2020, "Approximating KL divergence"; decoupled PPO objective —
Fu et al. 2025, AReaL (arXiv:2505.24298); truncated importance sampling (TIS) — Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"; token-mean — DAPO
(arXiv:2503.14476); Dr. GRPO — Liu et al. 2025, "Understanding R1-Zero-like training"
(arXiv:2503.20783).
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["std", "none"]
Mode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
MODES: tuple[str, ...] = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages `A_i = (r_i − mean(r)) / (std(r) + eps)` (GRPO, eq. 3 outcome supervision).

    `rewards[N]` holds `N / group_size` groups of `group_size` consecutive completions; mean and
    sample standard deviation (`torch.std`, Bessel-corrected, as TRL and verl) are taken per
    group. `scale="none"` is Dr. GRPO's unscaled `r_i − mean(r)`. A group whose rewards are all
    equal gets zero advantage. Completions without a reward are left out by the caller
    (call this once per group with that group's size).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} is not groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [N/G, G]
    centred = r - r.mean(dim=1, keepdim=True)  # [N/G, G]
    if scale == "none":
        return centred.view(-1)  # [N]
    if scale != "std":
        raise ValueError(f"unknown advantage scale {scale!r}")
    if group_size < 2:
        raise ValueError(
            "scale='std' needs group_size >= 2 (the sample std of one reward is undefined)"
        )
    std = r.std(dim=1, keepdim=True)  # [N/G, 1]
    return (centred / (std + eps)).view(-1)  # [N]


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): `π_ref/π_θ − log(π_ref/π_θ) − 1` (GRPO eq. 4).

    Always >= 0, unbiased for samples drawn from π_θ. Shapes `[N, T] -> [N, T]`.
    """
    log_ratio = logp_ref - logp  # [N, T]  log(π_ref/π_θ)
    return torch.exp(log_ratio) - log_ratio - 1  # [N, T]


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_behaviour: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    is_cap: float | None,
) -> torch.Tensor:
    """Decoupled clipped surrogate, per token: `−w · min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A)`.

    `ratio = π_θ/π_old` is the PPO ratio against the proximal policy (the learner's own
    log-probs at the start of the update); `w = min(π_old/μ, C)` is the truncated importance
    weight against the behaviour policy μ that sampled the tokens (AReaL's decoupled
    objective with TIS truncation). `w` carries no gradient; `is_cap=None` means `w = 1`.
    Shapes: `logp, logp_old, logp_behaviour [N, T]`, `adv [N]` -> `[N, T]`.
    """
    A = adv.unsqueeze(-1)  # [N, 1]
    ratio = torch.exp(logp - logp_old.detach())  # [N, T]
    ratio_clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [N, T]
    surrogate = torch.min(ratio * A, ratio_clipped * A)  # [N, T]
    w = importance_weight(logp_old, logp_behaviour, is_cap)  # [N, T]
    return -w * surrogate  # [N, T]


def importance_weight(
    logp_old: torch.Tensor, logp_behaviour: torch.Tensor, is_cap: float | None
) -> torch.Tensor:
    """Truncated importance weight `w = min(π_old/μ, C)`, detached; all ones when `is_cap` is None."""
    if is_cap is None:
        return torch.ones_like(logp_old)  # [N, T]
    w = torch.exp(logp_old - logp_behaviour)  # [N, T]
    return torch.clamp(w, max=is_cap).detach()  # [N, T]


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Reduce per-token values `x[N, T]` to a scalar over the tokens where `mask[N, T]` is 1.

    - `"seq-mean-token-mean"` (GRPO): mean over completions of each completion's token mean;
      rows with no token (padding rows) are not counted.
    - `"token-mean"` (DAPO): every token in the batch weighted equally.
    - `"seq-mean-token-sum-norm"` (Dr. GRPO): the sum over all tokens divided by `N·T`, a
      constant that does not depend on the completions' lengths.
    """
    mask = mask.to(x.dtype)  # [N, T]
    masked = x * mask  # [N, T]
    if mode == "seq-mean-token-mean":
        tokens = mask.sum(dim=-1)  # [N]
        seq_mean = masked.sum(dim=-1) / tokens.clamp(min=1)  # [N]
        return seq_mean.sum() / (tokens > 0).sum().clamp(min=1)  # []
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)  # []
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / x.numel()  # []
    raise ValueError(f"unknown aggregation mode {mode!r}; one of {MODES}")


def aggregate_share(mask_part: torch.Tensor, mask: torch.Tensor, mode: Mode) -> float:
    """The weight of a slice of rows in the batch aggregate.

    For rows `mask_part[n, T]` taken from `mask[N, T]` (same `T`), returns `s` such that summing
    `s_k · aggregate(x_k, mask_k, mode)` over a split of the batch into row slices equals
    `aggregate(x, mask, mode)`. This lets micro-batches (and data-parallel ranks) reproduce
    the full-batch loss exactly.
    """
    if mode == "seq-mean-token-mean":
        part, full = (mask_part.sum(-1) > 0).sum(), (mask.sum(-1) > 0).sum()
    elif mode == "token-mean":
        part, full = mask_part.sum(), mask.sum()
    elif mode == "seq-mean-token-sum-norm":
        part, full = mask_part.numel(), mask.numel()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; one of {MODES}")
    part, full = float(part), float(full)
    if part == 0:
        return 0.0
    return part / full


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_behaviour: torch.Tensor,
    logp_ref: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.04,
    is_cap: float | None = 2.0,
    mode: Mode = "seq-mean-token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective `aggregate(policy_loss + β · kl_k3, mask, mode)` (GRPO eq. 3, decoupled).

    `logp_ref` may be None when `beta == 0`. Returns the scalar loss and detached metrics,
    each a token mean over `mask`: `clip_fraction` (tokens whose clipped term is active),
    `ratio` (π_θ/π_old), `is_weight` (w), `kl` (k3; 0 when there is no reference), and
    `behaviour_gap`, `|log π_old − log μ|`: how far the behaviour policy is from the
    learner's (`is_weight`, a mean of π_old/μ over tokens sampled from μ, stays near 1 however
    far apart they are); at staleness 0 it is the actor's and the learner's numeric mismatch.
    """
    per_token = policy_loss(
        logp, logp_old, logp_behaviour, adv, eps_low, eps_high, is_cap
    )  # [N, T]
    if beta != 0:
        if logp_ref is None:
            raise ValueError("beta != 0 needs logp_ref")
        kl = kl_k3(logp, logp_ref)  # [N, T]
        per_token = per_token + beta * kl  # [N, T]
    elif logp_ref is not None:
        kl = kl_k3(logp, logp_ref)  # [N, T]  reported, not optimised
    else:
        kl = torch.zeros_like(logp)  # [N, T]
    loss = aggregate(per_token, mask, mode)  # []

    with torch.no_grad():
        A = adv.unsqueeze(-1)  # [N, 1]
        ratio = torch.exp(logp - logp_old)  # [N, T]
        clipped = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))  # [N, T]
        w = importance_weight(logp_old, logp_behaviour, is_cap)  # [N, T]
        metrics = {
            "clip_fraction": aggregate(clipped.to(logp.dtype), mask, "token-mean"),
            "ratio": aggregate(ratio, mask, "token-mean"),
            "is_weight": aggregate(w, mask, "token-mean"),
            "kl": aggregate(kl.detach(), mask, "token-mean"),
            "behaviour_gap": aggregate((logp_old - logp_behaviour).abs(), mask, "token-mean"),
        }
    return loss, metrics
