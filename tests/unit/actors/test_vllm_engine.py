"""The vLLM engine on CPU (vllm-cpu): log-probs, continuous batching, in-place weight reload.

One engine for the whole module: starting one takes 25-40 s here.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import pytest_asyncio
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed: pip install '.[cpu]' (or '.[gpu]')")

from actors.hf_engine import HfEngine  # noqa: E402
from actors.vllm_engine import VllmEngine  # noqa: E402
from learner.logprobs import completion_logprobs, pad_batch  # noqa: E402
from pipeline.tiny_model import TinySpec, save_tiny_model  # noqa: E402
from protocol.messages import Sampling  # noqa: E402
from tests.helpers import check_stop_strings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "Q:123+456="
# Longer than one KV block (16 tokens on CPU), so a stale prefix cache would show.
LONG_PROMPT = "Q:123+456=<think>3+6+0=9,2+5+0=7,1+4+0=5</think>Q:987+654="


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model_dir):
    torch.set_num_threads(1)
    engine = await VllmEngine.start(tiny_model_dir, enforce_eager=True, max_model_len=256)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return HfEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A second tiny model with the same shapes and different weights."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-seed1"), TinySpec(seed=1))


def _learner_logprobs(model, prompt, samples, temperature) -> list[np.ndarray]:
    prompt_ids, prompt_mask, completion_ids, completion_mask = pad_batch(
        [prompt] * len(samples), [s.token_ids.tolist() for s in samples]
    )
    with torch.no_grad():
        logp = completion_logprobs(
            model, prompt_ids, completion_ids, temperature, prompt_mask, completion_mask
        )  # [G, T]
    return [logp[i, : len(s.token_ids)].numpy() for i, s in enumerate(samples)]


async def test_generate_shapes_and_finish_reasons(engine, hf):
    eos = hf.tokenizer.eos_token_id
    prompts = [hf.tokenizer(PROMPT).input_ids, hf.tokenizer("Q:9+9=").input_ids]

    groups = await engine.generate_batch(prompts, Sampling(max_tokens=12, seed=0), n=4)

    assert len(groups) == 2
    for group in groups:
        assert group.policy_version == engine.version
        assert len(group.samples) == 4
        for s in group.samples:
            assert 1 <= len(s.token_ids) <= 12
            assert s.token_ids.dtype == np.int32 and s.logprobs.dtype == np.float32
            assert len(s.logprobs) == len(s.token_ids)
            assert np.all(s.logprobs <= 0)
            if s.finish_reason == "length":
                assert len(s.token_ids) == 12
            else:
                assert s.finish_reason == "stop"
                assert s.token_ids[-1] == eos  # EOS kept, as in the HF engine
            assert s.text == hf.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    assert len(set(lengths)) > 1 or lengths[0] == 12  # samples differ within a group


async def test_seeded_groups_repeat_and_samples_differ(engine, hf):
    prompt = hf.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=16, seed=11)

    a, b = await asyncio.gather(
        engine.generate(prompt, sampling, 4), engine.generate(prompt, sampling, 4)
    )

    tokens = [s.token_ids.tolist() for s in a.samples]
    assert tokens == [s.token_ids.tolist() for s in b.samples]
    assert len({tuple(t) for t in tokens}) > 1  # child i is seeded `seed + i`


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_logprobs_parity_vllm_hf_learner(engine, hf, temperature):
    """Same weights, fp32: vLLM's, HF generate's and the learner's log-probs agree to 1e-4."""
    prompt = hf.tokenizer(PROMPT).input_ids
    sampling = Sampling(temperature=temperature, max_tokens=32, seed=5)

    from_vllm = await engine.generate(prompt, sampling, n=8)
    from_hf = await hf.generate(prompt, sampling, n=8)

    for group in (from_vllm, from_hf):
        expected = _learner_logprobs(hf.model, prompt, group.samples, temperature)
        for s, logp in zip(group.samples, expected, strict=True):
            np.testing.assert_allclose(s.logprobs, logp, atol=1e-4, rtol=0)
    # Temperature is applied: at 0.7 these are not the untempered log-probs.
    if temperature != 1.0:
        untempered = _learner_logprobs(hf.model, prompt, from_vllm.samples, 1.0)
        assert (
            max(
                np.abs(s.logprobs - u).max()
                for s, u in zip(from_vllm.samples, untempered, strict=True)
            )
            > 1e-2
        )


async def test_concurrent_requests_are_batched(engine, hf):
    prompts = [hf.tokenizer(f"Q:{a}+{a}=").input_ids for a in range(100, 116)]
    sampling = Sampling(max_tokens=32, seed=0)

    loop = asyncio.get_running_loop()
    started = loop.time()
    groups = await asyncio.gather(*(engine.generate(p, sampling, 8) for p in prompts))
    together = loop.time() - started
    started = loop.time()
    await engine.generate(prompts[0], sampling, 8)
    one = loop.time() - started

    assert [len(g.samples) for g in groups] == [8] * 16
    # 16 groups submitted at once take far less than 16 times one group.
    assert together < 8 * one, (together, one)


async def test_reload_changes_outputs_and_matches_hf_on_new_weights(
    engine, tiny_model_dir, other_weights
):
    hf_new = HfEngine(other_weights)
    prompt = hf_new.tokenizer(LONG_PROMPT).input_ids
    assert len(prompt) > 32
    sampling = Sampling(max_tokens=24, seed=9)
    before = await engine.generate(prompt, sampling, n=4)  # fills the prefix cache
    old_version = engine.version

    await engine.load_weights(other_weights, version=old_version + 1)
    after = await engine.generate(prompt, sampling, n=4)

    assert after.policy_version == engine.version == old_version + 1
    assert [s.logprobs.tolist() for s in before.samples] != [
        s.logprobs.tolist() for s in after.samples
    ]
    for s, logp in zip(
        after.samples, _learner_logprobs(hf_new.model, prompt, after.samples, 1.0), strict=True
    ):
        np.testing.assert_allclose(s.logprobs, logp, atol=1e-4, rtol=0)

    # Back to the original weights, given as a list of files this time.
    await engine.load_weights([tiny_model_dir / "model.safetensors"], version=old_version + 2)
    again = await engine.generate(prompt, sampling, n=4)
    for s, t in zip(before.samples, again.samples, strict=True):
        assert s.token_ids.tolist() == t.token_ids.tolist()
        np.testing.assert_allclose(s.logprobs, t.logprobs, atol=1e-5, rtol=0)


async def test_reload_waits_for_generations_in_flight(engine, hf, other_weights, tiny_model_dir):
    prompt = hf.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=64, seed=1)
    version = engine.version

    running = asyncio.create_task(engine.generate(prompt, sampling, 8))
    await asyncio.sleep(0)  # submitted before the swap starts
    swap = asyncio.create_task(engine.load_weights(other_weights, version=version + 1))
    await asyncio.sleep(0)
    queued = asyncio.create_task(engine.generate(prompt, sampling, 8))  # waits for the swap
    old, _, new = await asyncio.gather(running, swap, queued)

    assert old.policy_version == version
    assert new.policy_version == version + 1
    await engine.load_weights(tiny_model_dir, version=version + 2)


async def test_weights_that_do_not_fit_are_refused(engine, hf, tmp_path):
    wider = save_tiny_model(tmp_path / "wider", TinySpec(hidden_size=128))
    prompt = hf.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=8, seed=4)
    served = await engine.generate(prompt, sampling, 2)
    version = engine.version

    with pytest.raises(ValueError, match="do not fit"):
        await engine.load_weights(wider, version=version + 1)

    still = await engine.generate(prompt, sampling, 2)
    assert engine.version == still.policy_version == version
    for a, b in zip(served.samples, still.samples, strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


async def test_stop_string_cuts_text_and_keeps_its_tokens(engine, hf):
    await check_stop_strings(engine, hf.tokenizer, PROMPT)
