"""A tiny Qwen2 built from a config (hidden 64, 2 layers) for the learner tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY_QWEN2 = dict(
    vocab_size=48,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
"""`transformers.Qwen2Config` arguments of the test model."""


@pytest.fixture
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2)).eval()


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="package", autouse=True)
def _leave_no_process_group():
    """The engine tests join a one-process gloo group; tear it down for the packages after us."""
    saved = {key: os.environ.get(key) for key in _DIST_ENV}
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
