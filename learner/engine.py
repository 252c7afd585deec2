"""The policy on DeepSpeed, and one GRPO update on it.

The same code runs on CPU (gloo) and GPU (nccl), as one process or several under `torchrun`.
Every rank is handed the same full batch; each trains on its own share of the micro-batches
and DeepSpeed averages the gradients, so the update equals the full-batch loss of
`learner.grpo.grpo_loss` (see `aggregate_share`) whatever the micro-batch size and world size.

Facts behind some choices (issue 4, measured with deepspeed 0.19.8):
- `deepspeed.init_distributed()` JIT-builds a shared-memory all-reduce op used only for
  inference (~2 min of g++). `init_distributed` here replaces its builder with a no-op; this
  touches a private function, hence the `deepspeed==0.19.8` pin.
- The optimizer is torch's AdamW (`torch_adam`): FusedAdam and CPUAdam compile for minutes.
- Gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): an update has
  as many micro-batches as its batch needs, and `engine.step()` ends it.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import socket
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from learner.config import DeepSpeedConfig, LearnerConfig, ModelConfig, OptimConfig
from learner.grpo import aggregate_share, grpo_loss
from learner.logprobs import completion_logprobs

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group `torchrun` describes (or make a world of one) without DeepSpeed's JIT op build."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] == "1":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one CPU fight over threads: steps were 5-35x slower here without a limit.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not the package attr
    comm_torch.build_shm_op = lambda: None
    import deepspeed
    import torch.distributed as dist

    if os.environ["WORLD_SIZE"] == "1" and not dist.is_initialized():
        # A world of one needs no rendezvous: an in-memory store, so no port to pick and lose
        # to another process between choosing it and binding it (EADDRINUSE, seen under load).
        # DeepSpeed then uses this process group as it is.
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed()


def load_policy(model: ModelConfig, seed: int) -> torch.nn.Module:
    """The HF causal LM in fp32: `from_pretrained(model.path)`, or a fresh Qwen2 from `model.qwen2`."""
    import transformers

    if model.path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.qwen2))


def lr_factor(step: int, optim: OptimConfig, total_steps: int | None = None) -> float:
    """Multiplier of `optim.lr` for optimizer step `step` (0-based): linear warmup, then constant
    or cosine over `optim.total_steps` (else `total_steps`: `LearnerConfig.schedule_steps`)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, (optim.total_steps or total_steps) - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine


def _precision_section(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "initial_scale_power": 16}}
    return {}


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for the policy engine."""
    ds: DeepSpeedConfig = config.deepspeed
    optim = config.optim
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": 1,  # unmanaged: each engine.step() is one update
        "managed_gradient_accumulation": False,
        "gradient_clipping": ds.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": {
            "stage": ds.zero_stage,
            # unmanaged accumulation allows overlap_comm only where gradients are partitioned
            "overlap_comm": ds.zero_stage >= 2,
        },
        **_precision_section(ds.precision),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _reference_config(config: LearnerConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.deepspeed.micro_batch,
        "zero_optimization": {"stage": 3},
        **_precision_section(config.deepspeed.precision),
        "steps_per_print": 1 << 30,
    }


@dataclass
class PolicyEngine:
    """The DeepSpeed engine of the policy, the frozen reference (None when β = 0) and the config."""

    engine: Any
    ref: torch.nn.Module | None
    config: LearnerConfig

    @property
    def module(self) -> torch.nn.Module:
        """The HF model inside the engine (its parameters are partitioned under ZeRO-3)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def rank(self) -> int:
        return self.engine.global_rank

    @property
    def world_size(self) -> int:
        return self.engine.dp_world_size


def setup_engine(config: LearnerConfig) -> PolicyEngine:
    """`deepspeed.initialize` the policy (and a frozen reference when `grpo.beta > 0`)."""
    import deepspeed

    if not torch.distributed.is_initialized():
        init_distributed()
    model = load_policy(config.model, config.seed)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if config.grpo.beta > 0 else None
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(config),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, optim=config.optim, total_steps=config.schedule_steps)
        ),
    )
    if ref is not None:
        if config.deepspeed.zero_stage == 3:
            ref, *_ = deepspeed.initialize(model=ref, config=_reference_config(config))
        else:
            ref = ref.to(engine.device, COMPUTE_DTYPES[config.deepspeed.precision])
    return PolicyEngine(engine=engine, ref=ref, config=config)


@dataclass
class PolicyBatch:
    """One update's completions as tensors; every rank passes the same full batch.

    Prompts are left-padded, completions right-padded (`learner.logprobs.pad_batch`).
    """

    prompt_ids: torch.Tensor
    """[N, P] int."""
    prompt_mask: torch.Tensor
    """[N, P], 1 on real prompt tokens."""
    completion_ids: torch.Tensor
    """[N, T] int."""
    completion_mask: torch.Tensor
    """[N, T], 1 on completion tokens that are trained on."""
    adv: torch.Tensor
    """[N] advantage of each completion (`learner.grpo.group_advantages`)."""
    logp_behaviour: torch.Tensor
    """[N, T] log μ the actor reported for each sampled token."""
    temperature: float = 1.0
    """The sampling temperature the actors used (log-probs are of the tempered distribution)."""

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, index: slice) -> PolicyBatch:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> PolicyBatch:
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> PolicyBatch:
        names = [f.name for f in fields(self) if f.name != "temperature"]
        return replace(self, **{name: fn(getattr(self, name)) for name in names})


def rank_micro_batches(n: int, micro_batch: int, rank: int, world_size: int) -> list[slice | None]:
    """Row slices of the micro-batches rank `rank` trains on; None pads so all ranks get as many.

    Micro-batch k (rows `k·micro_batch …`) goes to rank `k mod world_size`. Every rank must run
    the same number of forward/backward passes (ZeRO-3 gathers parameters in each).
    """
    chunks = [slice(s, min(s + micro_batch, n)) for s in range(0, n, micro_batch)]
    mine = chunks[rank::world_size]
    per_rank = math.ceil(len(chunks) / world_size)
    return mine + [None] * (per_rank - len(mine))


def _logprobs(model: torch.nn.Module, mb: PolicyBatch) -> torch.Tensor:
    return completion_logprobs(
        model, mb.prompt_ids, mb.completion_ids, mb.temperature, mb.prompt_mask, mb.completion_mask
    )  # [n, T]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank must take the same branch)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _poisoned_rows(mb: PolicyBatch, *logps: torch.Tensor | None) -> torch.Tensor:
    """[n] which rows of a micro-batch carry a non-finite advantage or log-prob; all rows
    when none does (the loss went non-finite some other way)."""
    bad = ~torch.isfinite(mb.adv)  # [n]
    for logp in logps:
        if logp is not None:
            bad |= (~torch.isfinite(logp) & mb.completion_mask.bool()).any(dim=1)  # [n]
    return bad if bad.any() else torch.ones_like(bad)


def _local_grads_finite(pe: PolicyEngine) -> bool:
    grads = [p.grad for p in pe.module.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _refuse(pe: PolicyEngine, n: int, what: str, bad: torch.Tensor | None) -> dict[str, Any]:
    """The result of an update that applied nothing: which rows (of all ranks) caused it."""
    rows = torch.zeros(n, device=pe.device) if bad is None else bad.float()
    if torch.distributed.is_initialized() and pe.world_size > 1:
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
    return {"nonfinite": what, "rows": [i for i, v in enumerate(rows.tolist()) if v]}


def minibatch_slices(n: int, minibatches: int) -> list[slice]:
    """The row slices of a batch of `n` rows cut into `minibatches` contiguous, nearly equal
    parts (fewer when there are fewer rows than parts: no empty update)."""
    k = min(minibatches, n)
    return [slice(n * i // k, n * (i + 1) // k) for i in range(k)]


def train_step(pe: PolicyEngine, batch: PolicyBatch) -> dict[str, Any]:
    """One GRPO update: π_old (and π_ref) recomputed once, then `ppo_epochs` passes over the
    batch, each cut into `minibatches` parts that are one optimizer step each (PPO's
    minibatches): `ppo_epochs × minibatches` optimizer steps in all.

    Returns metrics over the whole batch and all epochs: `loss`, `kl`, `clip_fraction`,
    `ratio`, `is_weight`, `behaviour_gap`, `lr`, `tokens`, `optimizer_steps`, and `grad_norm` (before
    clipping, last step) where DeepSpeed reports it (not ZeRO-0 in fp32).

    A non-finite loss (checked on every rank before its backward) or gradient (checked
    before the optimizer applies it) stops the update with nothing more applied; it returns
    `{"nonfinite": "loss" | "gradient", "rows": [...]}`, the batch rows to blame (those of
    the minibatch, every one of them when the gradient cannot tell). Optimizer steps already
    taken stay applied.
    """
    if len(batch) == 0:
        raise ValueError("empty batch")
    batch = batch.to(pe.device)
    micro_batch = pe.config.deepspeed.micro_batch
    plans = []  # per minibatch: its slice, this rank's absolute micro-batch slices, the rows
    for mini in minibatch_slices(len(batch), pe.config.grpo.minibatches):
        own = [
            None if s is None else slice(mini.start + s.start, mini.start + s.stop)
            for s in rank_micro_batches(mini.stop - mini.start, micro_batch, pe.rank, pe.world_size)
        ]
        # A rank with fewer micro-batches repeats its first one (or the minibatch's) with weight 0.
        filler = next((s for s in own if s is not None), slice(mini.start, mini.start + 1))
        plans.append((mini, own, [(batch.rows(s or filler), s is not None) for s in own]))

    pe.engine.train()
    with torch.no_grad():  # proximal π_old (and π_ref), once per update
        logp_old = [[_logprobs(pe.engine, mb) for mb, _ in micro] for _, _, micro in plans]
        logp_ref = [
            [_logprobs(pe.ref, mb) if pe.ref is not None else None for mb, _ in micro]
            for _, _, micro in plans
        ]

    # Sums over tokens (metrics) and over the loss shares; all-reduced at the end.
    totals = torch.zeros(len(_SUMS), dtype=torch.float64, device=pe.device)
    for _ in range(pe.config.grpo.ppo_epochs):
        for (mini, own, micro), old, ref in zip(plans, logp_old, logp_ref, strict=True):
            bad_rows = _backward_epoch(pe, batch, mini, own, micro, old, ref, totals)
            refused = _optimizer_step(pe, len(batch), bad_rows)
            if refused is not None:
                return refused
    return {
        **_update_metrics(pe, totals),
        "optimizer_steps": len(plans) * pe.config.grpo.ppo_epochs,
    }


_SUMS = ("loss", "tokens", "kl", "clip_fraction", "ratio", "is_weight", "behaviour_gap")
"""What `_backward_epoch` sums over an update: the loss shares, then token-weighted metrics."""


def _backward_epoch(
    pe: PolicyEngine,
    batch: PolicyBatch,
    mini: slice,
    own: list[slice | None],
    micro: list[tuple[PolicyBatch, bool]],
    logp_old: list[torch.Tensor],
    logp_ref: list[torch.Tensor | None],
    totals: torch.Tensor,
) -> torch.Tensor | None:
    """Forward and backward over this rank's micro-batches of minibatch `mini`, adding to
    `totals` (`_SUMS`; the loss weighted by the minibatch's share of the batch).

    Returns None, or, when a loss was not finite on some rank, the [N] rows to blame (every
    rank stops at that micro-batch after a backward that makes the gradients non-finite).
    """
    grpo = pe.config.grpo
    mini_mask = batch.completion_mask[mini]
    mini_share = aggregate_share(mini_mask, batch.completion_mask, grpo.mode)
    for k, (mb, real) in enumerate(micro):
        logp = _logprobs(pe.engine, mb)  # [n, T]
        loss, metrics = grpo_loss(
            logp,
            logp_old[k],
            mb.logp_behaviour,
            logp_ref[k],
            mb.adv,
            mb.completion_mask,
            eps_low=grpo.eps_low,
            eps_high=grpo.eps_high,
            beta=grpo.beta,
            is_cap=grpo.is_cap,
            mode=grpo.mode,
        )
        nonfinite = real and not bool(torch.isfinite(loss))
        if _any_rank(nonfinite, pe.device):
            bad_rows = torch.zeros(len(batch), dtype=torch.bool, device=pe.device)  # [N]
            if nonfinite:
                bad_rows[own[k]] = _poisoned_rows(mb, logp, logp_old[k], logp_ref[k])
            # Still backward (every rank, for ZeRO's collectives): the gradients turn
            # non-finite and the optimizer step's check discards everything accumulated.
            pe.engine.backward(loss * float("nan"), scale_wrt_gas=False)
            return bad_rows
        share = aggregate_share(mb.completion_mask, mini_mask, grpo.mode) if real else 0.0
        # DeepSpeed averages gradients over ranks; × world_size makes that the sum of shares.
        pe.engine.backward(loss * (share * pe.world_size), scale_wrt_gas=False)
        tokens = mb.completion_mask.sum().float() * float(real)  # fillers count nothing
        sums = [mini_share * share * loss.detach(), tokens]
        sums += [tokens * metrics[m] for m in _SUMS[2:]]
        totals += torch.stack(sums).double()
    return None


def _optimizer_step(
    pe: PolicyEngine, n: int, bad_rows: torch.Tensor | None
) -> dict[str, Any] | None:
    """Apply the accumulated gradients; the refusal (`_refuse`) when they are not finite."""
    what = "loss" if bad_rows is not None else "gradient"
    # ZeRO 1-3 (and DeepSpeed's bf16/fp16 optimizers) skip an update whose reduced
    # gradient norm is not finite and clear it; ZeRO-0 in fp32 steps whatever it holds,
    # so its local gradients are checked on every rank first.
    zero_0 = pe.config.deepspeed.zero_stage == 0
    if zero_0 and _any_rank(not _local_grads_finite(pe), pe.device):
        pe.engine.zero_grad()
        return _refuse(pe, n, what, bad_rows)
    skipped = pe.engine.skipped_steps
    pe.engine.step()
    if pe.engine.skipped_steps > skipped:
        return _refuse(pe, n, what, bad_rows)
    if bad_rows is not None:  # a NaN backward always fails one of the checks above
        raise RuntimeError("a non-finite loss was not caught by the gradient check")
    return None


def _update_metrics(pe: PolicyEngine, totals: torch.Tensor) -> dict[str, Any]:
    """The update's metrics from every rank's `totals` (`_SUMS` over all epochs)."""
    if torch.distributed.is_initialized() and pe.world_size > 1:
        torch.distributed.all_reduce(totals)
    sums = dict(zip(_SUMS, totals.tolist(), strict=True))
    epochs, tokens = pe.config.grpo.ppo_epochs, max(sums["tokens"], 1)
    metrics = {
        "loss": sums["loss"] / epochs,
        **{m: sums[m] / tokens for m in _SUMS[2:]},
        "lr": float(pe.engine.get_lr()[0]),
        "tokens": sums["tokens"] / epochs,
    }
    grad_norm = pe.engine.get_global_grad_norm()  # None with ZeRO-0 in fp32 (DeepSpeed drops it)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def save_checkpoint(
    pe: PolicyEngine, directory: str | Path, tag: str, client_state: dict[str, Any]
) -> None:
    """A DeepSpeed checkpoint (weights, optimizer, scheduler) plus `client_state`; every rank calls it."""
    pe.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)


def load_checkpoint(
    pe: PolicyEngine, directory: str | Path, tag: str | None = None
) -> dict[str, Any] | None:
    """Restore the checkpoint `tag` (default: the latest); returns its client state, None if there is none."""
    path, client_state = pe.engine.load_checkpoint(str(directory), tag=tag)
    return None if path is None else client_state
