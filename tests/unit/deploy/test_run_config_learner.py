"""The `[learner]` section `aha up` writes is a valid LearnerConfig for `aha learner`."""

import pytest

from learner.config import LearnerConfig
from protocol.config import ConfigError, load_config


def test_aha_up_run_config_loads(tmp_path):
    from deploy.runconfig import UpConfig, write_run_config

    up = UpConfig(engine="hf")
    path = write_run_config(
        up, tmp_path, tmp_path / "model", tmp_path / "rl.jsonl", "nats://127.0.0.1:4222"
    )
    config = load_config(LearnerConfig, path, section="learner")
    assert (config.max_steps, config.batch, config.max_staleness) == (60, 16, 2)  # the demo's
    assert config.in_flight_limit == (2 + 1) * 16
    assert config.dataset.template == "none" and config.dataset.prompt_field == "prompt"
    assert config.dataset.group_size == 8 and config.dataset.rewards["accuracy_gsm8k"] == 1.0
    assert config.metrics_file == str(tmp_path / "metrics.jsonl")
    assert config.final_model_dir == str(tmp_path / "final")
    assert (
        config.checkpoint_every == 1
        and not config.drop_zero_variance
        and config.metrics_port is None
    )


def test_dataset_refuses_unknown_template_and_single_completion_groups(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(
        '[learner.model]\npath = "m"\n[learner.dataset]\npath = "d.jsonl"\ntemplate = "alpaca"\ngroup_size = 1\n'
    )
    with pytest.raises(ConfigError) as e:
        load_config(LearnerConfig, path, section="learner")
    assert "learner.dataset.template" in str(e.value) and "learner.dataset.group_size" in str(
        e.value
    )


def test_held_groups_must_fit_the_scored_consumer(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(
        "[bus.scored]\nmax_ack_pending = 64\n"
        '[learner]\nbatch = 16\ncheckpoint_every = 8\n[learner.model]\npath = "m"\n'
    )
    with pytest.raises(ConfigError, match="128 scored groups are held until a checkpoint"):
        load_config(LearnerConfig, path, section="learner")


def test_resume_without_a_checkpoint_fails_at_start(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "rl.jsonl"
    data.write_text('{"prompt": "Q:1+2=", "answer": "3"}\n')
    path = tmp_path / "aha.toml"
    path.write_text(
        f'[learner]\ncheckpoint_dir = "{tmp_path / "ckpt"}"\n[learner.model]\npath = "m"\n'
        f'[learner.dataset]\npath = "{data}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "learner", "--config", str(path), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # a process of its own: the command configures logging for good
    assert done.returncode == 2
    assert "--resume: no checkpoint in" in done.stderr
