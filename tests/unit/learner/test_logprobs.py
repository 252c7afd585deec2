"""Learner log-probs equal what a sampler reports for the tempered distribution."""

import math

import pytest
import torch

from learner.logprobs import completion_logprobs, pad_batch, token_logprobs


def test_token_logprobs_tempered_by_hand():
    # logits [0, ln 2] at T = 1: softmax = [1/3, 2/3] -> log p(1) = ln(2/3)
    # at temperature 0.5 the logits become [0, 2 ln 2]: softmax = [1/5, 4/5] -> log p(1) = ln(4/5)
    logits = torch.tensor([[[0.0, math.log(2)]]])
    targets = torch.tensor([[1]])
    assert token_logprobs(logits, targets).item() == pytest.approx(math.log(2 / 3))
    assert token_logprobs(logits, targets, 0.5).item() == pytest.approx(math.log(4 / 5))
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32
    with pytest.raises(ValueError):
        token_logprobs(logits, targets, 0.0)


def _unpadded(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature  # [T, V]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]


@torch.no_grad()
def test_padded_batch_equals_each_sequence_alone(tiny_qwen2):
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    completions = [[11, 12], [13, 14, 15, 16], [17]]
    batch = pad_batch(prompts, completions, pad_id=0)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    assert prompt_ids.shape == (3, 5) and completion_ids.shape == (3, 4)
    assert prompt_mask[1].tolist() == [0, 0, 0, 1, 1]
    assert completion_mask[2].tolist() == [1, 0, 0, 0]
    logp = completion_logprobs(
        tiny_qwen2, prompt_ids, completion_ids, 0.7, prompt_mask, completion_mask
    )
    assert logp.shape == (3, 4) and logp.dtype == torch.float32
    for n, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        torch.testing.assert_close(logp[n, : len(c)], _unpadded(tiny_qwen2, p, c, 0.7))
        assert torch.all(logp[n, len(c) :] == 0)


@torch.no_grad()
def test_matches_hf_generate_scores(tiny_qwen2):
    # The HF sampler's processed scores are the tempered logits; their log-softmax at the
    # sampled token is the behaviour log-prob μ an HF actor reports.
    torch.manual_seed(1)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = tiny_qwen2.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=0.7,
        top_k=None,
        top_p=1.0,
        max_new_tokens=6,
        min_new_tokens=6,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    completion = out.sequences[:, prompt.shape[1] :]  # [1, 6]
    scores = torch.stack(out.scores, dim=1)  # [1, 6, V]
    sampler_logp = torch.log_softmax(scores.float(), -1).gather(-1, completion[..., None])[..., 0]
    logp = completion_logprobs(tiny_qwen2, prompt, completion, temperature=0.7)
    torch.testing.assert_close(logp, sampler_logp, atol=1e-5, rtol=1e-5)
