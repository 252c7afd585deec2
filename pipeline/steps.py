"""What the recipe's stages and the `aha distill` command do, as plain functions: run an `aha`
command as a child process, fine-tune with `aha sft`, sample a teacher, distill. They know
nothing of recipes (`pipeline.recipe` calls them with its stages' settings), so the commands
and the recipe share them without importing each other.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import tomli_w

from protocol.config import ConfigError


@functools.cache
def _prctl():
    """libc's `prctl`, resolved in the parent: the child only calls it (a `dlopen` after
    `fork` in a process with threads, the stages', could wait on a lock no thread will free)."""
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child: SIGKILL when the pipeline process dies (a killed run leaves no stage
    writing behind it). The signal follows the thread that started the child: a stage's
    thread waits for its command, so it outlives it."""
    _prctl()(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_children: set[subprocess.Popen] = set()
"""The stage commands running now (stages may run in several threads)."""
_children_lock = threading.Lock()


def stop_children() -> None:
    """SIGTERM to every stage command running now (the pipeline is stopping)."""
    with _children_lock:
        for proc in _children:
            proc.terminate()


def run_command(argv: list[str], log_file: Path) -> None:
    """`python -m deploy.cli ARGV` with its output in `log_file`; `ConfigError` with the log's
    last lines if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _prctl()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        with _children_lock:
            _children.add(proc)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            with _children_lock:
                _children.discard(proc)
    if code:
        tail = " | ".join(log_file.read_text(errors="replace").splitlines()[-3:])
        raise StageFailed(f"aha {argv[0]} exited with {code}: {tail} ({log_file})")


class StageFailed(RuntimeError):
    """A stage's command failed; the message names its log."""


def sft_config(
    folder: Path,
    model: Path,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    checkpoints: str = "checkpoints",
) -> Path:
    """`folder/sft.toml`: the `[learner]` section `aha sft` reads (fp32, one process, no KL:
    no reference model), its checkpoints in `folder/checkpoints`."""
    learner = {
        "model": {"path": str(model)},
        "batch": batch,
        "serving_dtype": "float32",
        "checkpoint_dir": str(folder / checkpoints),
        "seed": seed,
        "optim": {"lr": lr, "schedule": "cosine", "total_steps": steps},
        "deepspeed": {"precision": "fp32", "micro_batch": batch},
        "grpo": {"beta": 0.0},
    }
    path = folder / "sft.toml"
    path.write_text(tomli_w.dumps({"learner": learner}))
    return path


def run_sft(
    folder: Path, model: Path, data: list[Path], out: Path, steps, batch, lr, seed
) -> dict[str, Any]:
    """`aha sft` of `model` on the `data` files together, into `out`."""
    merged = folder / "data.jsonl"
    with open(merged, "wb") as f:
        for path in data:
            text = path.read_bytes()
            f.write(text if text.endswith(b"\n") or not text else text + b"\n")
    config = sft_config(folder, model, steps, batch, lr, seed)
    argv = ["sft", "--config", str(config), "--data", str(merged), "--out", str(out)]
    run_command([*argv, "--steps", str(steps)], folder / "sft.log")
    return {"examples": sum(1 for line in open(merged, "rb") if line.strip()), "steps": steps}


def sample_teacher(run, model: Path, prompts: Path, out: Path, stage) -> Path:
    """`stage.k` scored samples per prompt from `model`: through the bus (`pipeline.generate`,
    continuing a killed stage's file) or in this process (`pipeline.local_samples`). `run`:
    the recipe's `Run` (its shared sampling bus, the stages it resumes) or None."""
    from pipeline.generate import generate, read_prompt_file
    from pipeline.local_samples import sample_locally
    from protocol.messages import Sampling

    settings = stage.prompt_settings
    sampling = Sampling(
        temperature=stage.temperature, max_tokens=stage.max_tokens, seed=stage.filters.seed
    )
    problems = read_prompt_file(prompts, settings.prompt_field, settings.answer_field)
    if stage.sampler == "local":
        return sample_locally(model, problems, out, k=stage.k, sampling=sampling, settings=settings)
    return generate(
        model,
        problems,
        k=stage.k,
        sampling=sampling,
        rewards=settings.rewards,
        out=out,
        nats_url=run.bus.url(model, stage.max_tokens) if run else None,
        resume=out.exists() and run is not None and stage.name in run.resuming,
        meta={"answer_tag": settings.answer_tag},
    )


def distill(
    teacher: Path, student: Path, prompts: Path, folder: Path, out: Path, stage, run=None
) -> dict[str, Any]:
    """Teacher samples -> filters -> student SFT; `stage` carries the settings (a recipe's
    `DistillStage`), `run` the pipeline's bus and resumption (None: `aha distill` alone).
    Returns the counts."""
    from pipeline.rs import run_rs

    folder.mkdir(parents=True, exist_ok=True)
    samples = sample_teacher(run, teacher, prompts, folder / "samples.jsonl", stage)
    filters = stage.filters.model_copy(update={"rewards": None})  # scored as sampled
    report = run_rs(samples, folder / "rs.jsonl", filters, workers=1)
    if report["kept"] == 0:
        raise ConfigError(
            f"the teacher's samples: none passed the filters ({folder / 'rs.report.json'})"
        )
    sft = run_sft(
        folder,
        student,
        [folder / "rs.jsonl"],
        out,
        stage.steps,
        stage.batch,
        stage.lr,
        stage.seed,
    )
    result = {
        "teacher_samples": report["samples"],
        "kept": report["kept"],
        "dropped": report["dropped"],
        **sft,
    }
    (folder / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
