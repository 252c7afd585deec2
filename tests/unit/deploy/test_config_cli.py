"""`--set SECTION.FIELD=VALUE` and `aha config show`, through the real `aha` command."""

from __future__ import annotations

import json
import tomllib

import pytest

from deploy.cli import build_parser, main
from learner.config import LearnerConfig
from protocol.config import load_config, parse_value

LEARNER = """
[learner]
model = { qwen2 = { hidden_size = 16 } }
[learner.grpo]
beta = 0.1
[bus]
url = "nats://file:4222"
"""


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(LEARNER)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["learner"],
        ["sft", "--data", "x.jsonl", "--out", "x"],
        ["export", "--out", "x"],
        ["config", "show", "learner"],
    ],
)
def test_a_typo_in_set_names_the_field_and_the_fields_there_are(command, config, capsys):
    rc = main([*command, "--config", str(config), "--set", "learner.grpo.betta=0"])
    assert rc == 2
    line = error_line(capsys)
    assert line.startswith(f"aha {command[0]}: error: learner.grpo.betta: Extra inputs")
    assert "known: beta, eps_high, eps_low, is_cap, minibatches, mode, ppo_epochs" in line
    assert line.endswith("(--set)")  # not blamed on the file


@pytest.mark.parametrize(
    ("command", "item", "field"),
    [
        (["actor"], "actor.gpu_memory_utilisation=0.5", "actor.gpu_memory_utilisation"),
        (["rewarder"], "rewarder.sandbox.memory_mb=1", "rewarder.sandbox.memory_mb"),
        (["top", "--once"], "bus.tasks.max_deliver=0", "bus.tasks.max_deliver"),
        (["nats"], "bus.replicas=9", "bus.replicas"),
        (["nats"], "bus.replicas=3", "bus.replicas"),  # valid, but not on the embedded server
        (["up"], "up.actors=many", "up.actors"),
    ],
)
def test_every_command_with_a_config_validates_set_before_any_work(command, item, field, capsys):
    assert main([*command, "--set", item]) == 2
    assert f" {field}: " in error_line(capsys)


def test_set_of_a_section_the_command_does_not_read_is_refused(config, capsys):
    assert main(["learner", "--config", str(config), "--set", "actor.model=/m"]) == 2
    assert error_line(capsys) == (
        "aha learner: error: --set actor.*: this command reads only [learner] and [bus]"
    )


def test_config_show_prints_the_resolved_config_a_part_starts_with(config, tmp_path, capsys):
    rc = main(
        [
            "config",
            "show",
            "learner",
            "--config",
            str(config),
            "--set",
            "learner.grpo.beta=0",
            "--set",
            "learner.optim.betas=[0.9, 0.95]",
            "--set",
            "learner.dataset.path=data/gsm8k.jsonl",  # plain text: no quotes needed
            "--set",
            'learner.dataset.meta={language = "zh"}',
            "--set",
            "bus.url=nats://set:4222",
        ]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    data = tomllib.loads(shown)
    assert data["learner"]["grpo"]["beta"] == 0  # --set over the file's 0.1
    assert data["learner"]["optim"]["betas"] == [0.9, 0.95]
    assert data["learner"]["dataset"]["path"] == "data/gsm8k.jsonl"
    assert data["learner"]["dataset"]["meta"] == {"language": "zh"}
    assert data["bus"]["url"] == "nats://set:4222"
    assert data["learner"]["batch"] == 32  # defaults are shown too
    # what it prints is a config file the part loads to the same settings
    (tmp_path / "shown.toml").write_text(shown)
    again = load_config(LearnerConfig, tmp_path / "shown.toml", section="learner")
    assert again.grpo.beta == 0 and again.optim.betas == (0.9, 0.95)
    assert again.bus.url == "nats://set:4222"


def test_config_show_of_an_unknown_part_lists_the_parts(capsys):
    assert main(["config", "show", "lerner"]) == 2
    line = error_line(capsys)
    assert "no config section 'lerner'" in line
    assert "actor, bus, learner, rewarder, up" in line


def test_a_malformed_set_item_is_one_line(config, capsys):
    assert main(["learner", "--config", str(config), "--set", "learner.batch"]) == 2
    assert "--set learner.batch: expected SECTION.FIELD=VALUE" in error_line(capsys)


def test_values_are_toml_then_json_null_then_text():
    assert parse_value("0") == 0 and parse_value("0.6") == 0.6 and parse_value("true") is True
    assert parse_value('"a b"') == "a b" and parse_value("[1, 2]") == [1, 2]
    assert parse_value("null") is None
    assert parse_value("/models/qwen") == "/models/qwen"
    assert parse_value("nan") != parse_value("nan")  # TOML's nan: refused by validation


def test_null_sets_a_field_to_none_over_the_file(tmp_path):
    path = tmp_path / "aha.toml"
    path.write_text(LEARNER + "[learner.dataset]\npath = 'x.jsonl'\nmax_prompt_length = 9\n")
    sets = ["learner.dataset.max_prompt_length=null", "learner.max_steps=3"]
    config = load_config(LearnerConfig, path, section="learner", environ={}, sets=sets)
    assert config.dataset.max_prompt_length is None and config.max_steps == 3


def test_a_nan_from_set_is_refused(config, capsys):
    assert main(["learner", "--config", str(config), "--set", "learner.optim.lr=nan"]) == 2
    assert "learner.optim.lr: nan is not a finite number" in error_line(capsys)


def test_every_command_that_reads_a_config_takes_set():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    with_config = {
        name
        for name, p in commands.items()
        if any("--config" in a.option_strings for a in p._actions)
    }
    assert {"learner", "actor", "rewarder", "up", "sft", "export", "top", "nats", "score"} <= (
        with_config
    )
    for name in with_config:
        assert any("--set" in a.option_strings for a in commands[name]._actions), name


def test_aha_score_takes_the_sandbox_limits_from_set(tmp_path):
    # A program that takes 1.5 s passes its test under the default 10 s wall limit and fails
    # (the case times out: 0 of 1 passed) with --set rewarder.sandbox.wall_seconds=0.5.
    row = {
        "completion": "import time\ntime.sleep(1.5)\nprint(input()[::-1])",
        "reference": {"inputs": ["abc"], "outputs": ["cba"]},
        "rewards": {"code_tests": 1.0},
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    runs = {}
    for name, sets in (
        ("default", []),
        ("limited", ["--set", "rewarder.sandbox.wall_seconds=0.5"]),
    ):
        out = tmp_path / f"{name}.jsonl"
        argv = ["score", str(tmp_path / "in.jsonl"), "-o", str(out), "--workers", "1", *sets]
        assert main(argv) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["default"]["reward"] == 1.0
    assert runs["limited"]["reward"] == 0.0
