"""The demo's cold start: R1's first stage in miniature (DEMO.md's measured recipes).

A 211k-parameter Qwen3 built from a config (`pipeline.tiny_model.DEMO_SPEC`), then `aha sft`
on imperfect chains of thought for the 3-digit addition task (`pipeline/demo.py`), so that
GRPO starts from a model that reasons but often wrongly (recipe A: carries dropped) or that
sometimes thinks and sometimes guesses (recipe B). Also the demo's RL
prompts and held-out set, which never meet each other or the cold-start pairs.

    run_dir/base/         the model as built (random weights, the character tokenizer)
    run_dir/cold-start/   after SFT (present only once complete: written under another name
                          and renamed, so a run that is resumed can trust it)
    run_dir/data/         rl.jsonl, cold_start.jsonl
    run_dir/sft.toml      the `aha sft` config
    run_dir/logs/cold-start.log
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

import structlog

from pipeline.steps import sft_config
from pipeline.tiny_model import DEMO_SPEC, TinySpec, save_tiny_model

log = structlog.get_logger("pipeline.coldstart")

Recipe = Literal["think-or-guess", "buggy-carries"]
RECIPES: dict[str, dict[str, float]] = {
    "think-or-guess": {"chain_share": 0.4, "drop_carry": 0.0},
    "buggy-carries": {"chain_share": 1.0, "drop_carry": 0.8},
}
"""DEMO.md recipe B (40 % chains, 60 % direct answers) and A (chains dropping 80 % of carries):
both reach pass@1 ≳ 0.3, which GRPO needs; a clean but undertrained chain collapsed."""

SFT_LR = 2e-3
"""AdamW with cosine decay from this rate, batch 64, fresh problems every step (DEMO.md)."""
SFT_BATCH = 64


def demo_data(
    run_dir: Path, *, eval_problems: int, rl_problems: int, seed: int
) -> tuple[Path, list[dict]]:
    """The demo's RL prompts (written to `run_dir/data/rl.jsonl`) and its held-out set."""
    from pipeline import demo

    evaluation = demo.held_out(eval_problems)
    exclude = {r["prompt"] for r in evaluation}
    rows = demo.rl_prompts(rl_problems, seed=seed + 1, exclude=exclude)
    return demo.write_jsonl(rows, run_dir / "data" / "rl.jsonl"), evaluation


def cold_start_model(
    run_dir: Path,
    held_out: list[dict],
    *,
    steps: int,
    recipe: Recipe = "think-or-guess",
    seed: int = 0,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    on_step: Callable[[int], None] | None = None,
    spec: TinySpec | None = None,
) -> Path:
    """The tiny model from a config (`spec`, default `DEMO_SPEC`; its seed is `seed`), then
    `steps` of `aha sft` (0: the model as built).

    A complete `run_dir/cold-start/` from an earlier attempt is returned as it is. `on_step`
    is called with each SFT step done (read from the log as the process writes it).
    """
    from pipeline import demo

    out = run_dir / "cold-start"
    if steps and complete(run_dir):
        log.info("cold start reused", model=str(out))
        return out
    base = save_tiny_model(run_dir / "base", replace(spec or DEMO_SPEC, seed=seed))
    if steps == 0:
        return base
    exclude = {r["prompt"] for r in held_out}
    pairs = demo.write_jsonl(
        demo.cold_start(steps * SFT_BATCH, seed=seed + 2, exclude=exclude, **RECIPES[recipe]),
        run_dir / "data" / "cold_start.jsonl",
    )
    config = sft_config(run_dir, base, steps, SFT_BATCH, SFT_LR, seed, "sft-checkpoints")
    partial = run_dir / "cold-start.partial"
    shutil.rmtree(partial, ignore_errors=True)
    log.info("cold start", steps=steps, recipe=recipe)
    argv = [python, "-m", "deploy.cli", "sft", "--config", str(config), "--data", str(pairs)]
    argv += ["--out", str(partial), "--steps", str(steps)]
    run_logged(argv, run_dir / "logs" / "cold-start.log", {**os.environ, **(env or {})}, on_step)
    partial.rename(out)
    return out


def complete(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished cold start (its folder appears only when done)."""
    return (run_dir / "cold-start" / "config.json").exists()


def run_logged(
    argv: list[str], log_file: Path, env: dict[str, str], on_step: Callable[[int], None] | None
) -> None:
    """Run `argv` with its output into `log_file`, calling `on_step` for each `sft step` line.

    Raises `CalledProcessError` (with the log's last lines) when it fails; a KeyboardInterrupt
    stops the process before it is passed on.
    """
    with open(log_file, "wb") as f, open(log_file, "rb") as tail:
        proc = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_term_with_parent
        )
        try:
            pending = b""
            while proc.poll() is None:
                time.sleep(0.5)
                pending = _report_steps(pending + tail.read(), on_step)
            _report_steps(pending + tail.read(), on_step)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode:
        last = log_file.read_text(errors="replace").splitlines()[-10:]
        raise subprocess.CalledProcessError(proc.returncode, argv, output="\n".join(last))


def _term_with_parent() -> None:
    """In the SFT process: SIGTERM when its parent dies, even by SIGKILL (no orphan keeps
    training after an interrupted `aha up`; a resumed one starts the cold start again)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


STEP = re.compile(rb'\bstep"?\s*[=:]\s*(\d+)')
"""The step number in an `sft step` log line, as structlog's console (`step=3`) or JSON
(`"step": 3`) renderer writes it."""


def _report_steps(chunk: bytes, on_step: Callable[[int], None] | None) -> bytes:
    """Report the complete lines of `chunk` that are SFT steps; return the incomplete rest."""
    *lines, rest = chunk.split(b"\n")
    for line in lines:
        if on_step is not None and b"sft step" in line and (found := STEP.search(line)):
            on_step(int(found[1]))
    return rest
