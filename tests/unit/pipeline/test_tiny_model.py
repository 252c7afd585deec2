"""The tiny model folder loads through the ordinary HF entry points and tokenizes by character."""

from __future__ import annotations

import json

import pytest

from pipeline.tiny_model import TAGS, TinySpec, build_tokenizer, save_tiny_model

RESPONSE = "<think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>"


def test_folder_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    # DEMO.md: 21 characters + pad/bos/eos + 4 tags = 28 tokens, 162,560 parameters.
    assert len(tokenizer) == model.config.vocab_size == 28
    assert sum(p.numel() for p in model.parameters()) == 162_560
    assert model.config.tie_word_embeddings
    assert json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"] == (
        tokenizer.eos_token_id
    )


def test_one_token_per_character_and_per_tag(tiny_model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        tokenizer = cls.from_pretrained(tiny_model_dir)
        ids = tokenizer("Q:123+456=" + RESPONSE).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)

        assert tokens[0] == "<bos>"
        assert [t for t in tokens if t in TAGS] == ["<think>", "</think>", "<answer>", "</answer>"]
        # 10 prompt characters, 23 chain characters, 3 answer digits, 4 tags, bos.
        assert len(ids) == 1 + 10 + 23 + 3 + 4
        assert tokenizer.decode(ids, skip_special_tokens=True) == "Q:123+456=" + RESPONSE


def test_space_and_custom_characters_round_trip():
    tokenizer = build_tokenizer(TinySpec(characters="ab ", add_bos=False))

    ids = tokenizer("a b<answer>ba</answer>").input_ids

    assert len(tokenizer) == 3 + 3 + 4
    assert len(ids) == 3 + 1 + 2 + 1
    assert tokenizer.decode(ids) == "a b<answer>ba</answer>"


def test_non_ascii_characters_are_refused():
    with pytest.raises(ValueError, match="ASCII"):
        build_tokenizer(TinySpec(characters="aé"))


def test_qwen3_with_four_heads_of_32_at_width_64(tmp_path):
    """4 heads vLLM's CPU attention runs (width 32) on the demo's 64-wide model: queries,
    keys and values 128 wide, projected back to 64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = TinySpec(num_heads=4, num_kv_heads=4, head_dim=32, model_type="qwen3")
    save_tiny_model(tmp_path, spec)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)

    # Per layer: q, k, v 64x128 and o 128x64 (no biases) 32,768; q/k norms 2x32; FFN 3x64x192
    # 36,864; two layer norms 128: 69,824. Three layers, the tied embedding 28x64 and the
    # final norm: 3 x 69,824 + 1,792 + 64 = 211,328.
    assert sum(p.numel() for p in model.parameters()) == 211_328
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.head_dim, config.num_attention_heads) == ("qwen3", 32, 4)


def test_a_head_width_qwen2_would_drop_is_refused():
    with pytest.raises(ValueError, match="model_type qwen3"):
        TinySpec(num_heads=4, num_kv_heads=4, head_dim=32)
    with pytest.raises(ValueError, match="model_type"):
        TinySpec(model_type="llama")
