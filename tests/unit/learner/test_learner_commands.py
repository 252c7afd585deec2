"""`aha sft` and `aha export` on the tiny model: the folders they write load with from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.cli import main
from learner.config import LearnerConfig
from learner.engine import save_checkpoint, setup_engine
from learner.sft import sft_step, tokenize_pairs
from protocol.config import load_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def config_file(tmp_path, tiny_model_dir):
    path = tmp_path / "aha.toml"
    path.write_text(
        f"""
[learner]
checkpoint_dir = "{tmp_path / "ckpt"}"
serving_dtype = "float32"
[learner.model]
path = "{tiny_model_dir}"
[learner.optim]
lr = 0.01
[learner.deepspeed]
precision = "fp32"
micro_batch = 2
[learner.grpo]
beta = 0.0
"""
    )
    return path


PAIRS = [("Q:1+2=", "3"), ("Q:2+2=", "4"), ("Q:3+4=", "7"), ("Q:10+5=", "15")]


def test_sft_command_writes_a_loadable_model(tmp_path, config_file):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    out = tmp_path / "sft-out"
    argv = ["sft", "--config", str(config_file), "--data", str(data), "--out", str(out)]
    assert main(argv + ["--steps", "3", "--batch", "4"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("Q:1+2=")["input_ids"], skip_special_tokens=True) == "Q:1+2="
    assert model.config.vocab_size == len(tokenizer)


def test_export_command_restores_the_checkpoint(tmp_path, config_file, tiny_model_dir):
    config = load_config(LearnerConfig, config_file, section="learner")
    pe = setup_engine(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft_step(pe, tokenize_pairs(tokenizer, PAIRS), pad_id=tokenizer.pad_token_id)
    save_checkpoint(pe, config.checkpoint_dir, "step1", {"step": 1})
    out = tmp_path / "export"
    assert main(["export", "--config", str(config_file), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = pe.module.state_dict()
    for name, p in exported.state_dict().items():
        assert torch.equal(p, trained[name]), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(initial.model.embed_tokens.weight, exported.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer.pad_token_id


def test_export_without_checkpoint_is_a_clear_error(tmp_path, config_file, capsys):
    assert main(["export", "--config", str(config_file), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
