"""The GPU paths of the engines: vLLM (the `vllm` package) and DeepSpeed with NCCL.

Skipped without a GPU; on a GPU machine `pytest tests/gpu` runs them after
`pip install -e '.[dev,gpu]'`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from protocol.messages import Sampling


async def test_vllm_on_gpu_reports_the_learners_logprobs(tiny_model_dir):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.vllm_engine import VllmEngine
    from learner.logprobs import completion_logprobs, pad_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("Q:123+456=")["input_ids"]
    engine = await VllmEngine.start(
        tiny_model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.2
    )
    try:
        [group] = await engine.generate_batch([prompt], Sampling(max_tokens=24, seed=0), n=8)
    finally:
        await engine.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    ids = pad_batch([prompt] * 8, [s.token_ids.tolist() for s in group.samples])
    with torch.no_grad():
        logp = completion_logprobs(
            model, *(t.cuda() for t in ids[:2]), 1.0, *(t.cuda() for t in ids[2:])
        )
    for i, s in enumerate(group.samples):
        # fp32 on both sides; GPU kernels differ from the CPU ones, so 1e-3 rather than 1e-4.
        np.testing.assert_allclose(logp[i, : len(s.token_ids)].cpu().numpy(), s.logprobs, atol=1e-3)


def test_deepspeed_bf16_update_on_gpu(tiny_model_dir):
    from learner.config import LearnerConfig
    from learner.engine import PolicyBatch, setup_engine, train_step

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    config = LearnerConfig.model_validate(
        {
            "model": {"path": str(tiny_model_dir)},
            "deepspeed": {"zero_stage": 2, "precision": "bf16", "micro_batch": 4},
            "grpo": {"beta": 0.04},
        }
    )
    pe = setup_engine(config)
    assert pe.device.type == "cuda"
    before = {n: p.detach().float().clone() for n, p in pe.module.named_parameters()}
    g, t = 4, 6
    batch = PolicyBatch(
        prompt_ids=torch.randint(3, 20, (g, 5)),
        prompt_mask=torch.ones(g, 5, dtype=torch.long),
        completion_ids=torch.randint(3, 20, (g, t)),
        completion_mask=torch.ones(g, t, dtype=torch.long),
        adv=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        logp_behaviour=torch.full((g, t), -2.0),
        temperature=1.0,
    )
    metrics = train_step(pe, batch)
    assert np.isfinite(metrics["loss"])
    moved = sum(
        not torch.equal(before[n], p.detach().float()) for n, p in pe.module.named_parameters()
    )
    assert moved > 0
