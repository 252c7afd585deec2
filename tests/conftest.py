"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An HF folder with the demo's tiny Qwen2 and char-level tokenizer (pipeline/tiny_model.py)."""
    from pipeline.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
