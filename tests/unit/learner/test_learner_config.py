"""LearnerConfig loads from the shared config file and refuses what it cannot use."""

import pytest

from learner.config import LearnerConfig
from learner.engine import deepspeed_config
from protocol.config import ConfigError, load_config


def test_loads_learner_section_with_bus(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(
        """
[bus]
url = "nats://example:4222"

[learner]
batch = 8
[learner.model]
qwen2 = { hidden_size = 64, num_hidden_layers = 2 }
[learner.deepspeed]
zero_stage = 3
precision = "fp32"
[learner.grpo]
beta = 0.0
mode = "token-mean"
"""
    )
    config = load_config(
        LearnerConfig, path, section="learner", environ={"AHA_LEARNER__MAX_STALENESS": "4"}
    )
    assert config.bus.url == "nats://example:4222"
    assert config.batch == 8 and config.max_staleness == 4
    assert config.model.qwen2 == {"hidden_size": 64, "num_hidden_layers": 2}
    ds = deepspeed_config(config)
    assert ds["zero_optimization"]["stage"] == 3 and "bf16" not in ds
    assert ds["optimizer"]["params"]["torch_adam"] is True  # never JIT-build FusedAdam/CPUAdam


def test_defaults_follow_design():
    config = LearnerConfig(model={"path": "/models/x"})
    assert config.max_staleness == 2 and config.grpo.eps_low == 0.2 and config.grpo.beta == 0.04
    assert config.grpo.is_cap == 2.0 and config.grpo.mode == "seq-mean-token-mean"


@pytest.mark.parametrize(
    "learner, field",
    [
        ({}, "learner.model"),  # no policy at all
        ({"model": {"path": "a", "qwen2": {}}}, "learner.model"),  # two sources
        ({"model": {"path": "a"}, "deepspeed": {"zero_stage": 4}}, "learner.deepspeed.zero_stage"),
        ({"model": {"path": "a"}, "optim": {"schedule": "cosine"}}, "optim.total_steps"),
        ({"model": {"path": "a"}, "grpo": {"typo": 1}}, "learner.grpo.typo"),
    ],
)
def test_bad_config_names_the_field(learner, field):
    with pytest.raises(ConfigError) as e:
        load_config(LearnerConfig, section="learner", overrides=learner, environ={})
    assert field in str(e.value)
