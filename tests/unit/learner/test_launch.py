"""How `aha learner` lays out its ranks: node rank, rendezvous, the command each rank runs."""

import argparse

import pytest

from learner.config import LearnerConfig
from learner.launch import node_rank, worker_argv
from protocol.config import ConfigError, load_config


def learner(tmp_path, environ: dict[str, str], **values) -> LearnerConfig:
    path = tmp_path / "aha.toml"
    path.write_text("[learner.model]\nqwen2 = { hidden_size = 64, num_hidden_layers = 2 }\n")
    return load_config(LearnerConfig, path, section="learner", environ=environ, overrides=values)


def test_several_nodes_need_a_rendezvous_and_a_node_rank_below_nodes(tmp_path):
    with pytest.raises(ConfigError, match="nodes > 1 needs rendezvous"):
        learner(tmp_path, {"AHA_LEARNER__NODES": "2"})
    with pytest.raises(ConfigError, match="node_rank 2 is not below nodes = 2"):
        learner(
            tmp_path,
            {
                "AHA_LEARNER__NODES": "2",
                "AHA_LEARNER__NODE_RANK": "2",
                "AHA_LEARNER__RENDEZVOUS": "learner-0.learner:29400",
            },
        )
    with pytest.raises(ConfigError, match="is not host:port"):
        learner(tmp_path, {"AHA_LEARNER__NODES": "2", "AHA_LEARNER__RENDEZVOUS": "learner-0"})
    with pytest.raises(ConfigError, match="ranks"):
        learner(tmp_path, {"AHA_LEARNER__RANKS": "0"})


def test_node_rank_comes_from_the_config_or_the_pod_ordinal(tmp_path, monkeypatch):
    env = {"AHA_LEARNER__NODES": "3", "AHA_LEARNER__RENDEZVOUS": "aha-learner-0.aha-learner:29400"}
    assert node_rank(learner(tmp_path, {**env, "AHA_LEARNER__NODE_RANK": "1"})) == 1
    monkeypatch.setattr("socket.gethostname", lambda: "aha-learner-2")
    assert node_rank(learner(tmp_path, env)) == 2
    for host in ("aha-learner-3", "workstation"):
        monkeypatch.setattr("socket.gethostname", lambda host=host: host)
        with pytest.raises(ConfigError, match="learner.node_rank"):
            node_rank(learner(tmp_path, env))
    assert node_rank(learner(tmp_path, {})) == 0  # one node: whatever the host name


def test_each_rank_runs_the_same_learner_command():
    args = argparse.Namespace(config="/etc/aha/aha.toml", resume=True, max_steps=5, nats_url=None)
    assert worker_argv(args) == [
        "-m",
        "deploy.cli",
        "learner",
        "--config",
        "/etc/aha/aha.toml",
        "--resume",
        "--max-steps",
        "5",
    ]


def test_bad_input_is_one_line_from_the_command_not_one_per_rank(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "aha.toml"
    path.write_text(
        "[learner]\nranks = 2\n"
        f'checkpoint_dir = "{tmp_path / "none"}"\n'
        "[learner.model]\nqwen2 = { hidden_size = 64, num_hidden_layers = 2 }\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    for flags, error in (
        (["--resume"], f"--resume: no checkpoint in {tmp_path / 'none'}"),
        ([], "learner.dataset: aha learner needs a prompt dataset"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "learner", "--config", str(path), *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == f"aha learner: error: {error}"
        assert "starting learner ranks" not in done.stdout + done.stderr
