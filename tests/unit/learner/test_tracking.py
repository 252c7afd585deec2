"""TensorBoard event files and an offline W&B run, written by `learner.tracking` and read back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from learner import tracking
from learner.config import LearnerConfig
from protocol.messages import Score, ScoredRollout
from tests.helpers import make_rollout, make_task

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def records():
    """Three steps as `learner.loop.step_record` writes them (only the keys that matter)."""
    for step, reward in ((1, 0.25), (2, 0.5), (3, 0.75)):
        yield {
            "event": "step",
            "step": step,
            "version": step,
            "reward": reward,
            "rewards": {"accuracy_gsm8k": reward / 2, "format_think": None},
            "loss": -0.1 * step,
            "kl": None,  # left out, not logged as 0
            "task_ids": ["t1"],  # not a number: left out
            "groups_trained": 4 * step,
            "time": 1e9 + step,
        }


def scored(task_id: str, text: str, reward: float) -> ScoredRollout:
    task = make_task(1, group_size=2).model_copy(update={"task_id": task_id, "prompt": "Q:1+2="})
    rollout = make_rollout(task)
    first = rollout.samples[0].model_copy(update={"text": text})
    rollout = rollout.model_copy(update={"samples": [first, *rollout.samples[1:]]})
    return ScoredRollout(rollout=rollout, scores=[Score(reward=reward), Score(reward=0.0)])


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline run's `.wandb` file: W&B's LevelDB-log framing (a 7-byte
    file header `:W&B` + magic + version, then 32 KiB blocks of records, each a 7-byte header
    crc32/length/type and its chunk; FULL=1, FIRST=2, MIDDLE=3, LAST=4) around `Record` protos."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


def test_metrics_and_samples_reach_tensorboard_and_an_offline_wandb_run(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account, no network: offline must not care
    config = LearnerConfig.model_validate(
        {
            "model": {"qwen2": {"hidden_size": 8}},
            "metrics_file": str(tmp_path / "run" / "metrics.jsonl"),
            "tracking": {
                "backends": ["tensorboard", "wandb"],
                "samples_every_n_steps": 2,
                "samples_per_step": 1,
            },
        }
    )
    tracker = tracking.start(config)
    try:
        for record in records():
            step = record["step"]
            # the learner remembers each group it receives; the step trains t{step}
            for task_id in (f"t{step}", f"other{step}"):
                tracking.remember(scored(task_id, f"<think>{step}</think> 3|x", reward=1.0))
            record["task_ids"], record["task_ids_dropped"] = [f"t{step}"], [f"other{step}"]
            tracking.log_step(record)
        # an eval job of version 2 ends after step 3 (`learner.evaluation`'s line)
        tracking.log_eval(
            {"event": "eval", "step": 2, "version": 2, "bench": "gsm8k", "versions": [2, 3]}
            | {"problems": 4, "pass_at_1": 0.5, "pass_at_k": {"1": 0.5, "2": 0.75}}
        )
        assert tracking.SEEN == {}  # nothing kept past its step
    finally:
        tracking.stop()
    assert tracking.ACTIVE is None and tracker.wandb is None

    # next to metrics.jsonl: the run folder
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    values = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    assert values["reward"] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert values["reward/accuracy_gsm8k"] == [(1, 0.125), (2, 0.25), (3, 0.375)]
    assert [v for _, v in values["loss"]] == pytest.approx([-0.1, -0.2, -0.3])
    assert values["groups_trained"] == [(1, 4), (2, 8), (3, 12)]
    assert not {"kl", "task_ids", "time", "step", "reward/format_think"} & set(values)
    assert values["eval/gsm8k/pass_at_1"] == [(2, 0.5)]  # at the step it evaluated
    assert values["eval/gsm8k/pass_at_k/2"] == [(2, 0.75)]
    assert values["eval/gsm8k/problems"] == [(2, 4)]
    assert not {"eval/gsm8k/versions", "eval/gsm8k/version", "eval/gsm8k/bench"} & set(values)
    [text] = events.Tensors("samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 2  # every 2nd step, 1 row
    assert table.splitlines()[-1] == "2 | t2 | Q:1+2= | <think>2</think> 3\\|x | 1.0"

    [run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    history = wandb_history(run)
    steps = [r for r in history if "reward" in r]
    assert [(r["_step"], r["reward"]) for r in steps] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [r["groups_trained"] for r in steps] == [4, 8, 12]
    [evals] = [r for r in history if "eval/gsm8k/pass_at_1" in r]
    assert (evals["eval/step"], evals["eval/gsm8k/pass_at_k/2"]) == (2, 0.75)
    [sample_file] = (run / "files" / "media" / "table").glob("samples_2_*.table.json")
    assert json.loads(sample_file.read_text()) | {"column_types": None} == {
        "columns": ["step", "task_id", "prompt", "completion", "reward"],
        "data": [[2, "t2", "Q:1+2=", "<think>2</think> 3|x", 1.0]],
        "column_types": None,
    }


def test_no_backend_opens_nothing(tmp_path):
    config = LearnerConfig.model_validate({"model": {"qwen2": {}}})
    assert tracking.start(config) is None
    tracking.log_step(next(records()))  # a no-op
    assert tracking.ACTIVE is None
