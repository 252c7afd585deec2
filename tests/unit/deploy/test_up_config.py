"""What `aha up` hands its parts: one config file every process loads, and dataset wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import ActorConfig
from deploy.runconfig import UpConfig, write_run_config
from learner.config import LearnerConfig
from pipeline.presets import dataset_settings
from protocol.config import ConfigError, load_config
from rewarder.config import RewarderConfig

DATA = Path(__file__).parents[2] / "data"


def test_the_run_config_drives_every_part(tmp_path):
    flags = {"learner": {"max_steps": 7, "max_staleness": 1, "grpo": {"shuffle_rewards": True}}}
    path = write_run_config(
        UpConfig(), tmp_path, tmp_path / "model", tmp_path / "rl.jsonl", "nats://h:1", flags
    )
    learner = load_config(LearnerConfig, path, section="learner", environ={})
    actor = load_config(ActorConfig, path, section="actor", environ={})
    rewarder = load_config(RewarderConfig, path, section="rewarder", environ={})
    assert learner.bus.url == actor.bus.url == rewarder.bus.url == "nats://h:1"
    assert (learner.max_steps, learner.max_staleness, learner.batch) == (7, 1, 16)
    assert learner.grpo.shuffle_rewards and learner.grpo.beta == 0.01
    assert learner.dataset.rewards == {"accuracy_gsm8k": 1.0, "format_think": 0.1}
    assert learner.dataset.template == "none" and learner.dataset.group_size == 8
    assert actor.model == learner.model.path == str(tmp_path / "model")
    # where the learner's and the actors' tracking writes, once a backend is named
    assert actor.tracking.dir == str(tmp_path) and not actor.tracking.backends


@pytest.mark.parametrize(
    "file, prompt_field, accuracy",
    [
        ("gsm8k_test.jsonl", "question", "accuracy_gsm8k"),
        ("math500_test.jsonl", "problem", "accuracy_math"),
    ],
)
def test_real_datasets_work_as_they_are(file, prompt_field, accuracy):
    settings = dataset_settings(DATA / file, demo=False)
    assert settings["prompt_field"] == prompt_field and settings["answer_field"] == "answer"
    assert settings["template"] == "r1-zero"
    assert settings["rewards"] == {accuracy: 1.0, "format_think": 0.1}


def test_a_dataset_without_a_model_fails_at_start():
    with pytest.raises(ConfigError, match="a real dataset needs a real model"):
        load_config(UpConfig, overrides={"dataset": "gsm8k.jsonl"}, section="up", environ={})


def test_the_users_sections_refine_what_aha_up_chooses(tmp_path):
    parts = {
        "bus": {"url": "nats://elsewhere:4222", "scored": {"ack_wait_s": 900}},
        "learner": {"deepspeed": {"precision": "bf16"}, "serving_dtype": "bfloat16"},
        "actor": {"dtype": "bfloat16"},
        "up": {"max_steps": 3},
    }
    path = write_run_config(
        UpConfig(), tmp_path, tmp_path / "m", tmp_path / "d.jsonl", "nats://run:1", parts
    )
    learner = load_config(LearnerConfig, path, section="learner", environ={})
    actor = load_config(ActorConfig, path, section="actor", environ={})
    assert learner.deepspeed.precision == "bf16" and learner.serving_dtype == "bfloat16"
    assert learner.deepspeed.micro_batch == 32  # aha up's choice, untouched
    assert actor.dtype == "bfloat16"
    assert learner.bus.url == "nats://run:1"  # the run's own server wins
    assert learner.bus.scored.ack_wait_s == 900


def test_the_demo_takes_its_tuned_values_and_a_dataset_the_learners_defaults(tmp_path):
    """DEMO.md's GRPO values are the demo's only; a real dataset trains with the learner's own
    defaults (one definition: `LearnerConfig`), refined by the user's file."""
    demo = write_run_config(UpConfig(), tmp_path, tmp_path / "m", tmp_path / "rl.jsonl", "n://h:1")
    learner = load_config(LearnerConfig, demo, section="learner", environ={})
    assert (learner.optim.lr, learner.grpo.beta, learner.dataset.max_tokens) == (1e-4, 0.01, 64)
    assert (learner.grpo.mode, learner.grpo.ppo_epochs, learner.max_steps) == ("token-mean", 2, 60)

    up = UpConfig(model=str(tmp_path / "m"), dataset=str(DATA / "gsm8k_test.jsonl"))
    parts = {"learner": {"grpo": {"beta": 0.0}}}
    real = write_run_config(
        up, tmp_path, tmp_path / "m", DATA / "gsm8k_test.jsonl", "n://h:1", parts
    )
    learner = load_config(LearnerConfig, real, section="learner", environ={})
    optim, grpo = (LearnerConfig.model_fields[f].default_factory() for f in ("optim", "grpo"))
    assert learner.optim.lr == optim.lr and learner.grpo.mode == grpo.mode
    assert learner.dataset.max_tokens == 256 and learner.max_steps is None
    assert learner.grpo.beta == 0.0  # the user's file
    assert learner.dataset.prompt_field == "question"
