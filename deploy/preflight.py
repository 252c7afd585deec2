"""What `aha up` checks before it starts anything: the config file, the model folder, the dataset.

A bad input found after the cold start, or 30 s into a model load with a library's message,
costs the user minutes and says little. Every check here only reads small files; the first
failure raises `ConfigError`, which `aha` prints as one line naming the field or the file
(exit code 2) before the embedded server, the demo data, the cold start or any model load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, load_config, read_jsonl

WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
"""Weight files `from_pretrained` loads (one of them, or shards with their index)."""
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
"""Files an HF tokenizer is loaded from (either one)."""


def check_up(up, config_file: str | None, sets=(), flags: dict | None = None):
    """Raise `ConfigError` for the first input of `aha up` that cannot work: the `--config`
    file's sections (with the flags and `--set`) as the parts will load them, `--model`,
    `--dataset` and its fields. Returns the `[learner]` section as the learner will load it."""
    from deploy.runconfig import read_parts

    parts = read_parts(config_file, sets, flags)
    if up.model is not None:
        check_model_folder(Path(up.model))
    rows = list(read_jsonl(up.dataset)) if up.dataset is not None else []
    if up.dataset is not None and not rows:
        raise ConfigError(f"the dataset has no rows ({up.dataset})")
    where = ", ".join([config_file or "", "--set" if sets else ""]).strip(", ")
    learner = check_run_config(up, parts, where or None)
    if up.dataset is not None:
        check_dataset_rows(rows, learner.dataset, up.dataset)
    return learner


def resumed_name(up) -> str:
    """The run `aha up --resume` continues: `--name`, else the latest in `runs_dir`; a
    `ConfigError` when there is none (a run has its `aha.toml` once its loop started)."""
    runs = Path(up.runs_dir)
    if up.name is not None:
        if not (runs / up.name / "logs").is_dir():
            raise ConfigError(f"--resume: no run {up.name!r} in {runs.resolve()}")
        return up.name
    started = [d for d in runs.glob("*/logs") if d.is_dir()] if runs.is_dir() else []
    if not started:
        raise ConfigError(f"--resume: no run to resume in {runs.resolve()}")
    return max(started, key=lambda d: d.stat().st_mtime).parent.name


def check_model_folder(path: Path) -> None:
    """An HF causal-LM folder: a transformers config, weights and a tokenizer."""
    if not path.is_dir():
        raise ConfigError(f"--model: no such folder ({path})")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"--model: not an HF model folder, no config.json ({path})")
    try:
        model_type = json.loads(config.read_bytes()).get("model_type")
    except (ValueError, AttributeError, RecursionError):
        model_type = None
    if not isinstance(model_type, str):
        raise ConfigError(f"--model: not a transformers config, no model_type ({config})")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        raise ConfigError(f"--model: no weights ({' or '.join(WEIGHTS)}) ({path})")
    if not any((path / name).is_file() for name in TOKENIZER):
        raise ConfigError(f"--model: no tokenizer ({' or '.join(TOKENIZER)}) ({path})")


def check_run_config(up, parts: dict[str, Any], config_file: str | None):
    """The config every part will load, with the user's sections merged in as `aha up` does;
    returns the learner's. A bad field is named with the user's file, not the run's copy."""
    from actors.config import ActorConfig
    from deploy.runconfig import write_run_config
    from learner.config import LearnerConfig
    from rewarder.config import RewarderConfig
    from rewarder.rewards import check_rewards, load_plugins

    with tempfile.TemporaryDirectory(prefix="aha-preflight-") as tmp:
        model = Path(up.model) if up.model else Path(tmp) / "cold-start"
        dataset = Path(up.dataset) if up.dataset else Path(tmp) / "rl.jsonl"
        path = write_run_config(up, Path(tmp), model, dataset, "nats://127.0.0.1:4222", parts)
        try:
            learner = load_config(LearnerConfig, path, section="learner")
            load_config(ActorConfig, path, section="actor")
            rewarder = load_config(RewarderConfig, path, section="rewarder")
        except ConfigError as e:
            where = f"({config_file})" if config_file else "(AHA_* environment)"
            raise ConfigError(str(e).replace(f"({path})", where)) from None
    try:
        load_plugins(rewarder.plugins)  # the dataset may name them; they imported above
        check_rewards(learner.dataset.rewards)
    except ValueError as e:
        raise ConfigError(f"learner.dataset.rewards: {e} ({config_file or 'aha up'})") from None
    return learner


def check_dataset_rows(rows: list[tuple[int, dict]], dataset, path: str) -> None:
    """Every row has the prompt and the reference the learner will read."""
    fields = {"prompt_field": dataset.prompt_field, "answer_field": dataset.answer_field}
    for number, row in rows:
        for setting, field in fields.items():
            if row.get(field) is None:
                raise ConfigError(
                    f'no "{field}" field; the row has {sorted(row)[:8]} '
                    f"(learner.dataset.{setting}, {path}:{number})"
                )
