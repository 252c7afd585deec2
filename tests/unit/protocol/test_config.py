"""Config: one file for every process, env and flag overrides, errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from protocol.config import BusConfig, ConfigError, load_config


class DemoConfig(BaseModel):
    """Stands in for ActorConfig & co.: a process section plus the shared bus."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    concurrency: int = Field(4, ge=1)
    bus: BusConfig = Field(default_factory=BusConfig)


def test_one_file_drives_every_process(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(
        """
        [bus]
        url = "nats://nats:4222"
        [bus.tasks]
        ack_wait_s = 120
        [actor]
        concurrency = 8
        [actor.bus.tasks]
        max_deliver = 9
        [rewarder]
        concurrency = 2
        """
    )
    actor = load_config(DemoConfig, path, section="actor", environ={})
    rewarder = load_config(DemoConfig, path, section="rewarder", environ={})
    assert actor.concurrency == 8 and rewarder.concurrency == 2
    assert actor.bus.url == rewarder.bus.url == "nats://nats:4222"
    # the section's own bus table refines the shared one, key by key
    assert (actor.bus.tasks.ack_wait_s, actor.bus.tasks.max_deliver) == (120, 9)
    assert (rewarder.bus.tasks.ack_wait_s, rewarder.bus.tasks.max_deliver) == (120, 5)


def test_environment_then_flags_override_the_file(tmp_path):
    path = tmp_path / "aha.yaml"
    path.write_text("actor:\n  concurrency: 8\nbus:\n  url: nats://file:4222\n")
    environ = {"AHA_ACTOR__CONCURRENCY": "16", "AHA_BUS__TASKS__MAX_DELIVER": "7"}
    config = load_config(DemoConfig, path, section="actor", environ=environ)
    assert config.concurrency == 16 and config.bus.tasks.max_deliver == 7
    config = load_config(
        DemoConfig, path, section="actor", environ=environ, overrides={"concurrency": 32}
    )
    assert config.concurrency == 32


def test_a_bad_field_fails_at_start_with_its_name(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text("[actor]\nconcurrency = 0\n[actor.bus.tasks]\nack_wait_s = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, path, section="actor", environ={})
    message = str(e.value)
    assert "actor.concurrency: Input should be greater than or equal to 1" in message
    assert "actor.bus.tasks.ack_wait_s: Input should be greater than 0" in message

    path.write_text("[actor]\nconcurency = 3\n")  # a typo is an error, not a silent default
    with pytest.raises(ConfigError, match="actor.concurency: Extra inputs are not permitted"):
        load_config(DemoConfig, path, section="actor", environ={})

    path.write_text("[actorr]\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['actorr'\]"):
        load_config(DemoConfig, path, section="actor", environ={})

    path.write_text("[bus\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(DemoConfig, path, section="actor", environ={})


def test_bus_rules_and_nats_url():
    with pytest.raises(ConfigError, match="password is set without user"):
        load_config(BusConfig, overrides={"password": "x"}, environ={})
    with pytest.raises(ConfigError, match="replicas: Input should be less than or equal to 5"):
        load_config(BusConfig, overrides={"replicas": 7}, environ={})
    assert BusConfig().stage("scored").ack_wait_s == 300.0
    assert (
        load_config(BusConfig, environ={"AHA_BUS__URL": "nats://a:1"}).resolved_url == "nats://a:1"
    )


@pytest.mark.parametrize(
    "name, text, environ, field",
    [
        (
            "aha.toml",
            "[actor.bus.tasks]\nack_wait_s = nan\n",
            {},
            "actor.bus.tasks.ack_wait_s: nan",
        ),
        ("aha.toml", "[bus.tasks]\nack_wait_s = inf\n", {}, "bus.tasks.ack_wait_s: inf"),
        (
            "aha.yaml",
            "bus:\n  scored:\n    backoff_s: [1, .inf]\n",
            {},
            "bus.scored.backoff_s[1]: inf",
        ),
        (
            "aha.toml",
            "",
            {"AHA_BUS__CONNECT_TIMEOUT_S": "-.inf"},
            "actor.bus.connect_timeout_s: -inf",
        ),
    ],
)
def test_nan_and_infinity_are_never_settings(tmp_path, name, text, environ, field):
    # TOML's nan/inf and YAML's .nan/.inf parse as floats; no setting of ours means them
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, path, section="actor", environ=environ)
    assert f"{field} is not a finite number ({path})" == str(e.value)
    with pytest.raises(ValueError, match="Input should be a finite number"):
        BusConfig(connect_timeout_s=float("inf"))  # built in code, not loaded: the same rule


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("aha.toml", b"[actor]\nconcurrency = 3 # \xff\n", "not UTF-8: byte 0xff (PATH:2)"),
        ("aha.toml", b"x = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("aha.yaml", b"x: " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("aha.yaml", b"actor: [1\n", "not valid YAML: while parsing a flow sequence"),
        ("missing.toml", None, "cannot read: No such file or directory"),
    ],
)
def test_a_file_that_is_no_config_is_one_line_naming_it(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, path, section="actor", environ={})
    message = str(e.value).replace(str(path), "PATH")
    assert message.startswith(reason) and "(PATH" in message and "\n" not in message
