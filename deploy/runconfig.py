"""What an `aha up` run is configured by: its `[up]` section (`UpConfig`), the user's sections
for the parts (`read_parts`, `learner_flags`), and the one config file every part of the run
reads (`write_run_config`). `deploy/up.py` starts the run; `deploy/preflight.py` checks it
first; both import this, neither the other's internals.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, model_validator

from pipeline.coldstart import Recipe
from pipeline.presets import DEMO_LEARNER, dataset_settings
from protocol.config import CONFIG, merge, nest, parse_sets, read_config


def _default_engine() -> str:
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") else "hf"


class UpConfig(BaseModel):
    """The `[up]` section: what `aha up` starts and how long it runs."""

    model_config = CONFIG

    name: str | None = None
    """Run name (folder under `runs_dir`); default: the start time."""
    runs_dir: str = "runs"
    """Where runs are written."""
    model: str | None = None
    """An HF causal-LM folder to train; None = the demo's tiny model with its cold start."""
    dataset: str | None = None
    """Prompt JSONL (GSM8K and MATH-500 formats work as they are); None = the demo task."""
    actors: int = Field(1, ge=0)
    """Actor processes; 0: none started, the actors already on an external bus (`[bus] url`
    or `NATS_URL`) serve the run (`aha pipeline`'s grpo stages)."""
    rewarders: int = Field(1, ge=0)
    """Rewarder processes; 0: those already on the external bus score the run."""
    rewarder_workers: int = Field(1, ge=1)
    """Verifier processes per rewarder."""
    engine: Literal["vllm", "hf"] = Field(default_factory=_default_engine)
    """Actors' sampling engine: vLLM when installed, else the HF reference."""
    cold_start_steps: int = Field(1000, ge=0)
    """SFT steps of the demo's cold start (0 skips it)."""
    cold_start_recipe: Recipe = "buggy-carries"
    """DEMO.md recipe A (every example reasons, 80 % of its carries dropped) or B
    (`think-or-guess`: 40 % chains, 60 % direct answers). The demo's 4-head model learns B's
    direct answers in 1,400 steps (pass@1 0.90 before any RL), and from a 700-step B cold
    start its GRPO ends at 0.65 in 30 steps, against 0.93 from A (README)."""
    eval_problems: int = Field(500, ge=1)
    """Held-out problems for accuracy before and after."""
    eval_samples: int = Field(4, ge=0)
    """Samples per problem at temperature 1 for pass@1 (0 skips it)."""
    seed: int = 0
    """Seed of the data, the model and the run."""
    resume: bool = False
    """Continue the run `name` (default: the latest in `runs_dir`): its cold start, the
    learner's checkpoint and the queues in its NATS store are reused."""
    restart: bool = True
    """Restart actors and rewarders that die (the learner ending or dying ends the run)."""
    stall_after_s: float = Field(60.0, gt=0)
    """Seconds a stage may have work waiting without progress before it is reported stalled."""

    @model_validator(mode="after")
    def _dataset_needs_model(self):
        if self.dataset is not None and self.model is None:
            raise ValueError(
                "dataset: a real dataset needs a real model (--model PATH); "
                "the demo's tiny model only knows digits"
            )
        return self


def write_run_config(
    up: UpConfig,
    run_dir: Path,
    model: Path,
    dataset: Path,
    nats_url: str,
    parts: dict[str, Any] | None = None,
) -> Path:
    """The one config file every part reads (also usable to start the parts by hand).

    What any `aha up` run sets (paths in the run folder, one process per part on this
    machine), then for the demo its tuned values (`pipeline.presets.DEMO_LEARNER`), then
    `parts` — the `[bus]`, `[learner]`, `[actor]` and `[rewarder]` sections of the user's
    `--config` file and flags — key by key (e.g. bf16 on GPUs). Everything else is the
    parts' own defaults.
    """
    demo = up.dataset is None
    config = {
        "bus": {"url": nats_url},
        "learner": {
            "model": {"path": str(model)},
            "serving_dtype": "float32",
            "shard_mb": 64,
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "weights_dir": str(run_dir / "weights"),
            "metrics_file": str(run_dir / "metrics.jsonl"),
            "final_model_dir": str(run_dir / "final"),
            "seed": up.seed,
            "ranks": 1,  # the actors share this machine's GPUs: one learner rank, not one per GPU
            "deepspeed": {"precision": "fp32"},  # CPUs have no fast bf16: a GPU run says so
            "dataset": {**dataset_settings(dataset, demo=demo), "seed": up.seed},
        },
        # tracking, where turned on (`--set actor.tracking.backends=[...]`): the run folder
        "actor": {"model": str(model), "backend": up.engine, "tracking": {"dir": str(run_dir)}},
        "rewarder": {"workers": up.rewarder_workers},
    }
    if demo:
        config = merge(config, {"learner": DEMO_LEARNER})
    config = merge(config, {k: v for k, v in (parts or {}).items() if k != "up"})
    config["bus"]["url"] = nats_url  # the run's server, whatever the file says
    # `[learner.eval]` pins each eval to its version as a model folder there: actors serve it
    evals = str(Path(config["learner"]["checkpoint_dir"]) / "eval")
    config["actor"]["model_dirs"] = [*config["actor"].get("model_dirs", []), evals]
    path = run_dir / "aha.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def read_parts(config_file: str | None, sets=(), flags: dict | None = None) -> dict[str, Any]:
    """The user's sections for the parts: the `--config` file, then `aha up`'s flags for
    learner fields, then `--set`."""
    return merge(read_config(config_file), merge(flags or {}, parse_sets(sets)))


def learner_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The `[learner]` fields `aha up` has flags for, over the config file's."""
    return nest(
        {
            "learner.max_steps": args.max_steps,
            "learner.max_staleness": args.max_staleness,
            "learner.grpo.shuffle_rewards": args.shuffle_rewards or None,
        }
    )
