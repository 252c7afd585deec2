"""The HF reference engine: shapes, finish reasons, stop strings, weight swaps, log-prob parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.hf_engine import HfEngine
from learner.logprobs import completion_logprobs, pad_batch
from pipeline.tiny_model import TinySpec, save_tiny_model
from protocol.messages import Sampling
from tests.helpers import check_stop_strings

PROMPT = "Q:123+456="


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(1)
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


async def test_generate_shapes_and_finish_reasons(engine):
    prompts = [engine.tokenizer(PROMPT).input_ids, engine.tokenizer("Q:9+9=").input_ids]

    groups = await engine.generate_batch(prompts, Sampling(max_tokens=12, seed=0), n=3)

    assert len(groups) == 2
    for group in groups:
        assert group.policy_version == 0
        assert len(group.samples) == 3
        for s in group.samples:
            assert 1 <= len(s.token_ids) <= 12
            assert s.token_ids.dtype == np.int32 and s.logprobs.dtype == np.float32
            assert len(s.logprobs) == len(s.token_ids)
            assert np.all(s.logprobs <= 0)
            if s.finish_reason == "length":
                assert len(s.token_ids) == 12
            else:
                # EOS is kept as the last token: the learner must learn to stop.
                assert s.finish_reason == "stop"
                assert s.token_ids[-1] == engine.tokenizer.eos_token_id
            assert s.text == engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)


async def test_seed_reproduces_a_group(engine):
    prompt = engine.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=16, seed=7)

    a = await engine.generate(prompt, sampling, n=4)
    b = await engine.generate(prompt, sampling, n=4)

    assert [s.token_ids.tolist() for s in a.samples] == [s.token_ids.tolist() for s in b.samples]


async def test_stop_string_cuts_text_and_tokens(engine):
    await check_stop_strings(engine, engine.tokenizer, PROMPT)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_logprobs_match_the_learner(engine, temperature):
    prompt = engine.tokenizer(PROMPT).input_ids

    group = await engine.generate(
        prompt, Sampling(temperature=temperature, max_tokens=24, seed=2), n=4
    )

    expected = _learner_logprobs(engine.model, prompt, group.samples, temperature)
    for s, logp in zip(group.samples, expected, strict=True):
        np.testing.assert_allclose(s.logprobs, logp, atol=1e-4, rtol=0)


async def test_load_weights_changes_outputs_and_version(tiny_model_dir, other_weights):
    engine = HfEngine(tiny_model_dir)
    prompt = engine.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=16, seed=3)
    before = await engine.generate(prompt, sampling, n=4)

    await engine.load_weights([other_weights / "model.safetensors"], version=5)
    after = await engine.generate(prompt, sampling, n=4)

    assert engine.version == after.policy_version == 5
    assert [s.logprobs.tolist() for s in before.samples] != [
        s.logprobs.tolist() for s in after.samples
    ]
    reference = HfEngine(other_weights)
    for s, logp in zip(
        after.samples, _learner_logprobs(reference.model, prompt, after.samples, 1.0), strict=True
    ):
        np.testing.assert_allclose(s.logprobs, logp, atol=1e-4, rtol=0)


async def test_weights_of_another_shape_are_refused(tiny_model_dir, tmp_path):
    engine = HfEngine(tiny_model_dir)
    wider = save_tiny_model(tmp_path / "wider", TinySpec(hidden_size=128))
    embed_before = engine.model.get_input_embeddings().weight.clone()

    with pytest.raises(ValueError, match="shape"):
        await engine.load_weights(wider, version=1)

    assert engine.version == 0
    assert torch.equal(engine.model.get_input_embeddings().weight, embed_before)


LOAD_IN_THREADS = """
import sys, threading
from actors.hf_engine import HfEngine
engines, errors = [], []
def load():
    try:
        engines.append(HfEngine(sys.argv[1]))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(engines), errors)
"""


def test_engines_load_side_by_side_in_threads_of_one_process(tiny_model_dir):
    """`aha pipeline` runs stages in threads; two in-process evaluations load their models at
    once. Without the load lock, 16 of 20 such loads failed with "Cannot copy out of meta
    tensor", and a first import of transformers in two threads with "cannot import name
    'AutoModelForCausalLM'" (measured): a fresh interpreter, so the import races too."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[3]
    argv = [sys.executable, "-c", LOAD_IN_THREADS, str(tiny_model_dir)]
    out = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4 []"
