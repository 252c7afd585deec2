"""`aha up` with a bad input: one error line naming the field or file, before anything starts.

Each case runs the real command. A run that started would create its run folder and log the
cold start (minutes of SFT before the loop): neither may happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.preflight import check_up
from deploy.runconfig import UpConfig
from learner.config import LearnerConfig
from protocol.config import load_config

ROOT = Path(__file__).parents[3]
DATA = ROOT / "tests" / "data"


def aha_up(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("AHA_") and k != "NATS_URL"}
    argv = [sys.executable, "-m", "deploy.cli", "up", *map(str, args)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def fake_model(folder: Path, config: dict | None = None) -> Path:
    """The files an HF folder has (their contents are not read before the loop starts)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "qwen2"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def assert_failed_at_start(result: subprocess.CompletedProcess, cwd: Path, message: str) -> None:
    assert result.returncode == 2, result.stderr
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert result.stderr.strip().splitlines() == [f"aha up: error: {message}"]
    assert "cold start" not in out and not (cwd / "runs").exists()  # nothing was started


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "[learner]\nbatchh = 3\n",
            "learner.batchh: Extra inputs are not permitted "
            f"(known: {', '.join(sorted(LearnerConfig.model_fields))}) (CONFIG)",
        ),
        ("[learner.grpo]\nbeta = nan\n", "learner.grpo.beta: nan is not a finite number (CONFIG)"),
        ("[learner.optim]\nlr = inf\n", "learner.optim.lr: inf is not a finite number (CONFIG)"),
        (
            "[learner.dataset.rewards]\naccuracy_gsm8k = -inf\n",
            "learner.dataset.rewards.accuracy_gsm8k: -inf is not a finite number (CONFIG)",
        ),
        (
            "[learner.dataset.rewards]\naccuracy_gsm8k = 1.0\naccuracy = 1.0\n",
            "learner.dataset.rewards: unknown reward(s) ['accuracy']; known: ['accuracy_gsm8k', "
            "'accuracy_math', 'code_tests', 'format_think', 'language_consistency'] (CONFIG)",
        ),
        (
            "[learner.deepspeed]\nzero_stage = 4\n",
            "learner.deepspeed.zero_stage: Input should be less than or equal to 3 (CONFIG)",
        ),
        (
            '[actor]\ndtype = "fp8"\n',
            "actor.dtype: Input should be 'float32', 'bfloat16' or 'float16' (CONFIG)",
        ),
        (
            "[rewarder]\nworkers = 0\n",
            "rewarder.workers: Input should be greater than or equal to 1 (CONFIG)",
        ),
        ("[up]\nstall_after_s = nan\n", "up.stall_after_s: nan is not a finite number (CONFIG)"),
        (
            "[up]\nactors = 0\n",
            "up.actors, up.rewarders: 0 uses those of an external bus ([bus] url or NATS_URL); "
            "the embedded server has none",
        ),
        (b'[up]\nname = "\xe9t\xe9"\n', "not UTF-8: byte 0xe9 (CONFIG:2)"),
        (b"x = " + b"[" * 50_000 + b"]" * 50_000, "nested too deeply to be a config (CONFIG)"),
    ],
)
def test_a_bad_config_file_fails_before_the_cold_start(tmp_path, config, message):
    path = tmp_path / "aha.toml"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    result = aha_up(tmp_path, "--config", path)
    assert_failed_at_start(result, tmp_path, message.replace("CONFIG", str(path)))


def test_a_model_that_is_not_a_model_folder_fails_before_anything_loads(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    not_transformers = fake_model(tmp_path / "other", {"hidden": 8})
    no_weights = fake_model(tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    for model, message in [
        (missing, f"--model: no such folder ({missing})"),
        (empty, f"--model: not an HF model folder, no config.json ({empty})"),
        (
            not_transformers,
            f"--model: not a transformers config, no model_type ({not_transformers / 'config.json'})",
        ),
        (no_weights, f"--model: no weights (*.safetensors or pytorch_model*.bin) ({no_weights})"),
    ]:
        assert_failed_at_start(aha_up(tmp_path, "--model", model), tmp_path, message)


def test_a_dataset_with_wrong_fields_fails_before_anything_loads(tmp_path):
    model = fake_model(tmp_path / "model")
    rows = tmp_path / "rows.jsonl"
    cases = [
        (
            b'{"prompt": "1+1", "answer": "2"}\n',
            "no \"problem\" field; the row has ['answer', 'prompt'] "
            "(learner.dataset.prompt_field, ROWS:1)",
        ),
        (
            b'\n{"question": "1+1"}\n',  # the format is read from the first row, not line
            "no \"answer\" field; the row has ['question'] (learner.dataset.answer_field, ROWS:2)",
        ),
        (
            b'{"question": "1+1", "answer": "#### 2"}\n\n{"question": "2+2", "answer": null}\n',
            "no \"answer\" field; the row has ['answer', 'question'] "
            "(learner.dataset.answer_field, ROWS:3)",
        ),
        (
            b'{"question": "1+1", "answer": "#### 2"}\n{"question": "\xff"}\n',
            "not UTF-8: byte 0xff (ROWS:2)",
        ),
        (
            b'{"question": "1+1", "answer": "#### 2"}\n{"question": \n',
            "not JSON: Expecting value at column 14 (ROWS:2)",
        ),
        (b"\n", "the dataset has no rows (ROWS)"),
    ]
    for content, message in cases:
        rows.write_bytes(content)
        result = aha_up(tmp_path, "--model", model, "--dataset", rows)
        assert_failed_at_start(result, tmp_path, message.replace("ROWS", str(rows)))
    missing = tmp_path / "missing.jsonl"
    result = aha_up(tmp_path, "--model", model, "--dataset", missing)
    assert_failed_at_start(result, tmp_path, f"cannot read: No such file or directory ({missing})")


def test_good_inputs_pass_the_checks(tmp_path):
    # the checks must not refuse what works: the demo, and real datasets with their own fields
    check_up(UpConfig(), None)
    model = fake_model(tmp_path / "model")
    config = tmp_path / "aha.toml"
    config.write_text('[learner.deepspeed]\nprecision = "bf16"\n[actor]\ndtype = "bfloat16"\n')
    for dataset in ("gsm8k_test.jsonl", "math500_test.jsonl"):
        overrides = {"model": str(model), "dataset": str(DATA / dataset)}
        up = load_config(UpConfig, config, section="up", overrides=overrides, environ={})
        check_up(up, str(config))


def test_resume_without_a_run_to_resume_fails_at_start(tmp_path):
    runs = tmp_path / "runs"
    result = aha_up(tmp_path, "--resume")
    assert_failed_at_start(result, tmp_path, f"--resume: no run to resume in {runs}")
    result = aha_up(tmp_path, "--resume", "--name", "nope")
    assert_failed_at_start(result, tmp_path, f"--resume: no run 'nope' in {runs}")


def test_the_configs_bus_url_wins_over_nats_url_as_for_every_part(tmp_path, monkeypatch):
    """`aha pipeline` writes its own bus into each grpo stage's config: a `NATS_URL` left in
    the user's shell must not send that stage's learner to another server."""
    from deploy.up import nats_server
    from protocol.config import BusConfig

    monkeypatch.setenv("NATS_URL", "nats://elsewhere:4222")
    with nats_server(tmp_path, "nats://pipeline:4222") as (url, server):
        assert (url, server) == ("nats://pipeline:4222", None)
    assert BusConfig(url="nats://pipeline:4222").resolved_url == url
    with nats_server(tmp_path) as (url, server):  # no [bus] url: NATS_URL, as the parts read it
        assert (url, server) == ("nats://elsewhere:4222", None)
