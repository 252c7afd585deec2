"""The DeepSpeed engine takes the same step as plain torch with the same loss."""

import copy
import dataclasses
import math

import pytest
import torch

from learner.config import (
    DeepSpeedConfig,
    GRPOConfig,
    LearnerConfig,
    ModelConfig,
    OptimConfig,
)
from learner.engine import (
    PolicyBatch,
    load_checkpoint,
    load_policy,
    lr_factor,
    minibatch_slices,
    rank_micro_batches,
    save_checkpoint,
    setup_engine,
    train_step,
)
from learner.grpo import aggregate_share, group_advantages, grpo_loss
from learner.logprobs import completion_logprobs

from .conftest import TINY_QWEN2

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def make_config(stage: int, **grpo) -> LearnerConfig:
    return LearnerConfig(
        model=ModelConfig(qwen2=TINY_QWEN2),
        # Adam ε = 1 keeps the first update sensitive to the gradient's size (with ε ≈ 0 it would
        # be lr · sign(g), hiding a wrongly scaled loss).
        optim=OptimConfig(lr=0.5, eps=1.0, warmup_steps=2),
        deepspeed=DeepSpeedConfig(zero_stage=stage, precision="fp32", micro_batch=2, grad_clip=1.0),
        grpo=GRPOConfig(ppo_epochs=2, **grpo),
    )


def make_batch(model: torch.nn.Module, seed: int = 0) -> PolicyBatch:
    """2 groups of 3 completions; prompts of 2-4 tokens, completions of 1-5 tokens."""
    g = torch.Generator().manual_seed(seed)
    N, P, T, V = 6, 4, 5, TINY_QWEN2["vocab_size"]
    prompt_ids = torch.randint(1, V, (N, P), generator=g)
    prompt_len = torch.tensor([4, 4, 4, 2, 2, 2])
    prompt_mask = (torch.arange(P) >= P - prompt_len[:, None]).long()
    completion_ids = torch.randint(1, V, (N, T), generator=g)
    completion_mask = (torch.arange(T) < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]).long()
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0]), group_size=3)
    with torch.no_grad():
        logp = completion_logprobs(
            model, prompt_ids, completion_ids, 0.8, prompt_mask, completion_mask
        )
    # μ differs from π_old by up to ±1 nat, so some importance weights hit the cap of 2
    logp_behaviour = logp + (torch.rand(N, T, generator=g) * 2 - 1)
    return PolicyBatch(
        prompt_ids, prompt_mask, completion_ids, completion_mask, adv, logp_behaviour, 0.8
    )


def plain_torch_update(config: LearnerConfig, batch: PolicyBatch):
    """The same update written directly in torch, on the full batch at once."""
    model = load_policy(config.model, config.seed)
    ref = copy.deepcopy(model).requires_grad_(False)
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o))
    b = batch
    args = (b.prompt_ids, b.completion_ids, b.temperature, b.prompt_mask, b.completion_mask)
    with torch.no_grad():
        logp_old = completion_logprobs(model, *args)
        logp_ref = completion_logprobs(ref, *args)
    g = config.grpo
    n = len(b)
    minis = [
        slice(n * i // g.minibatches, n * (i + 1) // g.minibatches) for i in range(g.minibatches)
    ]
    losses, norms = [], []
    for _ in range(g.ppo_epochs):
        epoch_loss = 0.0
        for m in minis:
            part = (b.prompt_ids[m], b.completion_ids[m], b.temperature, b.prompt_mask[m])
            logp = completion_logprobs(model, *part, b.completion_mask[m])
            loss, _ = grpo_loss(
                logp,
                logp_old[m],
                b.logp_behaviour[m],
                logp_ref[m],
                b.adv[m],
                b.completion_mask[m],
                eps_low=g.eps_low,
                eps_high=g.eps_high,
                beta=g.beta,
                is_cap=g.is_cap,
                mode=g.mode,
            )
            loss.backward()
            norms.append(
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.deepspeed.grad_clip)
            )
            opt.step()
            sched.step()
            opt.zero_grad()
            share = aggregate_share(b.completion_mask[m], b.completion_mask, g.mode)
            epoch_loss += share * loss.item()
        losses.append(epoch_loss)
    return model, sum(losses) / len(losses), norms[-1].item()


def full_params(pe) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in pe.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = p.detach().clone()
    return out


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("minibatches", [1, 2])
def test_deepspeed_update_equals_plain_torch(stage, mode, minibatches):
    config = make_config(stage, mode=mode, minibatches=minibatches)
    pe = setup_engine(config)
    batch = make_batch(load_policy(config.model, config.seed))
    metrics = train_step(pe, batch)

    expected, expected_loss, expected_norm = plain_torch_update(config, batch)
    got = full_params(pe)
    initial = dict(load_policy(config.model, config.seed).named_parameters())
    moved = max((p - initial[n]).abs().max().item() for n, p in expected.named_parameters())
    assert moved > 1e-3  # the update is large enough for the comparison to mean something
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), atol=1e-6, rtol=1e-5, msg=name)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    if stage > 0:  # DeepSpeed does not report the norm of ZeRO-0 fp32
        assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    assert metrics["lr"] == pytest.approx(0.5)  # after 2 warmup steps: factor (1+1)/2 = 1
    # 2 passes over the batch, each in `minibatches` parts: 2 or 4 optimizer steps
    assert metrics["optimizer_steps"] == pe.engine.global_steps == 2 * minibatches
    assert 0 < metrics["is_weight"] <= 2.0 and metrics["kl"] > 0


def test_rank_micro_batches_pad_to_equal_counts():
    # 5 rows, micro-batch 2 -> chunks [0:2] [2:4] [4:5]; rank 0 gets chunks 0 and 2, rank 1
    # gets chunk 1 and a filler so both run two passes
    assert rank_micro_batches(5, 2, 0, 2) == [slice(0, 2), slice(4, 5)]
    assert rank_micro_batches(5, 2, 1, 2) == [slice(2, 4), None]
    assert rank_micro_batches(5, 2, 0, 1) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_lr_schedule_by_hand():
    # warmup 2: steps 0, 1 -> 1/2, 2/2. cosine over total 6 from step 2: progress (s-2)/4,
    # factor 0.1 + 0.9 · (1 + cos(π·progress)) / 2 -> step 4: progress 1/2 -> 0.1 + 0.45 = 0.55;
    # step 6 and after: 0.1
    o = OptimConfig(schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    got = [lr_factor(s, o) for s in (0, 1, 2, 4, 6, 9)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert lr_factor(100, OptimConfig()) == 1.0
    assert math.isclose(lr_factor(3, o), 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)


def cosine_config(**fields) -> LearnerConfig:
    return LearnerConfig(
        model=ModelConfig(qwen2=TINY_QWEN2),
        grpo=GRPOConfig(ppo_epochs=2, minibatches=2),
        **fields,
    )


def test_a_cosine_without_total_steps_spans_the_run():
    # 30 GRPO steps of 2 PPO epochs x 2 minibatches: 120 optimizer steps; halfway (step 60)
    # the factor is (1 + cos(π/2)) / 2 = 0.5, at 120 and after it is 0.
    config = cosine_config(max_steps=30, optim=OptimConfig(lr=1e-4, schedule="cosine"))
    assert config.schedule_steps == 120
    got = [lr_factor(s, config.optim, config.schedule_steps) for s in (0, 60, 120, 150)]
    assert got == pytest.approx([1.0, 0.5, 0.0, 0.0])
    # Set, optim.total_steps wins over the run's length.
    optim = OptimConfig(schedule="cosine", total_steps=10)
    assert cosine_config(max_steps=30, optim=optim).schedule_steps == 10


def test_a_cosine_with_no_length_at_all_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="optim.total_steps"):
        cosine_config(optim=OptimConfig(schedule="cosine"))


def test_checkpoint_resume_is_bit_exact(tmp_path):
    config = make_config(0, beta=0.0)
    pe = setup_engine(config)
    batch = make_batch(load_policy(config.model, config.seed))
    train_step(pe, batch)
    save_checkpoint(pe, tmp_path, "step1", {"step": 1})
    train_step(pe, batch)
    after_two = full_params(pe)

    resumed = setup_engine(config)
    assert load_checkpoint(resumed, tmp_path)["step"] == 1
    train_step(resumed, batch)
    for name, p in full_params(resumed).items():
        assert torch.equal(p, after_two[name]), name
    assert load_checkpoint(setup_engine(config), tmp_path / "nothing") is None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_non_finite_loss_applies_nothing_and_names_its_rows(stage):
    # Row 4's advantage is NaN (rewards that overflow float64 give one): its micro-batch
    # (rows 4-5 with micro_batch 2) has a NaN loss. Rows 0-3 were already backpropagated
    # when it is found: their gradients must not survive into the next update either.
    config = make_config(stage)
    pe = setup_engine(config)
    before = full_params(pe)
    good = make_batch(load_policy(config.model, config.seed))
    poisoned = dataclasses.replace(
        good, adv=good.adv.clone().index_fill_(0, torch.tensor([4]), math.nan)
    )

    result = train_step(pe, poisoned)

    assert result == {"nonfinite": "loss", "rows": [4]}
    for name, p in full_params(pe).items():
        assert torch.equal(p, before[name]), name
    # The next update is exactly a fresh engine's first: no gradient, Adam moment or LR step
    # of the refused one is left.
    train_step(pe, good)
    fresh = setup_engine(config)
    train_step(fresh, good)
    expected = full_params(fresh)
    for name, p in full_params(pe).items():
        assert torch.equal(p, expected[name]), name


def test_minibatch_slices_by_hand():
    # 128 rows in 2 parts: two optimizer steps of 64; 7 rows in 3: 2, 2, 3 (n·i//k cut points
    # 0, 2, 4, 7); more parts than rows: one row each, no empty update
    assert minibatch_slices(128, 2) == [slice(0, 64), slice(64, 128)]
    assert minibatch_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert minibatch_slices(2, 4) == [slice(0, 1), slice(1, 2)]
