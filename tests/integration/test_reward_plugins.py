"""Plug-in rewards named by import path, through a real `aha rewarder` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from protocol.bus import Bus
from protocol.config import BusConfig
from protocol.names import ROLLOUTS, SCORED
from protocol.server import NatsServer
from protocol.stage import StageConsumer
from tests.helpers import make_rollout, make_task

ROOT = Path(__file__).parents[2]
EXACT = "tests.reward_plugins:exact"


def aha(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", *args]


def write_config(path: Path, plugins: list[str], timeout_s: float = 30.0) -> Path:
    listed = ", ".join(f'"{p}"' for p in plugins)
    path.write_text(f"[rewarder]\nworkers = 1\ntimeout_s = {timeout_s}\nplugins = [{listed}]\n")
    return path


def rollout(texts: list[str], rewards: dict[str, float], reference: str = "42"):
    task = make_task(1, group_size=len(texts)).model_copy(
        update={"reference": reference, "rewards": rewards}
    )
    r = make_rollout(task)
    samples = [s.model_copy(update={"text": t}) for s, t in zip(r.samples, texts, strict=True)]
    return r.model_copy(update={"samples": samples})


async def test_a_plugin_reward_scores_through_a_real_rewarder_with_the_builtin_rules(tmp_path):
    plugins = [EXACT, "tests.reward_plugins:undecided", "tests.reward_plugins:stalls"]
    config = write_config(tmp_path / "aha.toml", plugins, timeout_s=3.0)
    with NatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusConfig(url=server.url), name="test")
        proc = subprocess.Popen(
            aha("rewarder", "--config", str(config), "--nats-url", server.url),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # exact + 0.1 format: "42" right 1.0 (no think: format 0); a think block and the
            # answer after it: exact 0 (the text is not "42"), format 1 -> 0.1.
            await bus.publish(
                ROLLOUTS,
                rollout(["42", "<think>x</think> 42"], {EXACT: 1.0, "format_think": 0.1}),
            )
            # the plug-in's VerifierError and its timeout: no reward with the reason, never 0;
            # a plug-in the rewarder did not load: unknown, no reward.
            for i, name in enumerate(
                ["tests.reward_plugins:undecided", "tests.reward_plugins:stalls", "os:system"]
            ):
                r = rollout(["42", "41"], {name: 1.0})
                r = r.model_copy(update={"task": r.task.model_copy(update={"task_id": f"t{i}"})})
                await bus.publish(ROLLOUTS, r)
            consumer = StageConsumer(bus, SCORED)
            scored = {}
            while len(scored) < 4:
                for d in await consumer.fetch(4, timeout=60):
                    scored[d.message.task_id] = d.message.scores
                    await d.ack_sync()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            await bus.close()
    right, formatted = scored["task-1"]
    assert right.reward == 1.0 and right.components == {EXACT: 1.0, "format_think": 0.0}
    assert formatted.reward == pytest.approx(0.1)
    assert formatted.components == {EXACT: 0.0, "format_think": 1.0}
    for s in scored["t0"]:
        assert s.reward is None
        assert s.error == "tests.reward_plugins:undecided: this plug-in cannot decide"
    assert all(s.reward is None and "timeout" in s.error for s in scored["t1"]), scored["t1"]
    assert all(s.reward is None and "unknown reward" in s.error for s in scored["t2"])
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [
        ("tests.no_such_module:exact", "cannot import tests.no_such_module: ModuleNotFoundError"),
        ("tests.reward_plugins:missing", "tests.reward_plugins has no function missing"),
        ("tests.reward_plugins:NOT_A_FUNCTION", "has no function NOT_A_FUNCTION"),
        ("tests.reward_plugins:takes_one_argument", "does not take (completion, reference, task)"),
        ("tests.reward_plugins", "is not package.module:function"),
    ],
)
def test_a_broken_plugin_stops_the_rewarder_at_start_with_one_line(
    tmp_path, monkeypatch, capsys, plugin, reason
):
    config = write_config(tmp_path / "aha.toml", [plugin])
    # no NATS server at all: the plug-ins are checked before the rewarder connects
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    assert main(["rewarder", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aha rewarder: error: rewarder.plugins: ")
    assert reason in lines[0] and str(config) in lines[0]


def test_aha_score_uses_the_plugins_set_on_its_command_line(tmp_path):
    rows = [{"completion": c, "reference": "42", "rewards": {EXACT: 2.0}} for c in ("42", "4 2")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["score", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--workers", "1", "--set", f'rewarder.plugins=["{EXACT}"]']) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["reward"] for o in out] == [2.0, 0.0]  # 2.0 x exact
