"""`aha pipeline RECIPE.toml [--resume]`: R1's stages as one recipe, each stage recorded.

A recipe is a `[pipeline]` table and a list of `[[stages]]`, each a `kind` (`sft`, `grpo`,
`rs`, `eval`, `distill`) with its inputs. An input is a path (relative to the recipe file),
`$run/…` (inside the run folder), or `@stage` — the output of an earlier stage (`@stage/…`: a
path inside that stage's folder). Everything is checked before any work: unknown kinds and
fields, references to stages that do not come earlier, models and files that are not there.

Each stage writes into `<run>/<stage>/` and records, in `<run>/stages/<stage>.json`, the hash
of its settings and inputs (its fingerprint), its outputs and their hash, its time and its
result. `--resume` skips a stage that is done with the same fingerprint and intact outputs; a
stage whose inputs changed (an earlier stage reran, a file was edited) runs again, and so does
one killed midway (its record says `running`). Without `--resume`, a run folder that has
records is refused: nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
import tomli_w
from pydantic import BaseModel, Field, ValidationError

from pipeline.local_samples import PromptSettings
from pipeline.rs import FilterConfig
from pipeline.steps import (
    StageFailed,
    distill,
    run_command,
    run_sft,
    sample_teacher,
    stop_children,
)
from protocol.config import CONFIG, ConfigError, read_file


def log():
    """The logger, bound when called (a run's `setup_logging` picks where lines go)."""
    return structlog.get_logger("pipeline.recipe")


Kind = Literal["sft", "grpo", "rs", "eval", "distill"]
Sampler = Literal["bus", "local"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
Ref = Annotated[str, Field(min_length=1)]
"""A path, `$run/…`, or `@stage[/…]` (see the module docstring)."""

MODEL_FIELDS = ("model", "teacher", "student")
"""Inputs that must be HF model folders (a `config.json` inside)."""
MODEL_KINDS = frozenset({"sft", "grpo", "distill"})
"""Stages whose output is a model folder."""
POOL_FIELDS = frozenset({"actors", "rewarders", "rewarder_workers", "engine", "restart"})
"""`[up]` fields of the actors and rewarders, which the pipeline's pool has instead."""


class _Stage(BaseModel):
    model_config = CONFIG

    name: Name
    """The stage's name: its folder in the run and what `@name` refers to."""


class SftStage(_Stage):
    """Supervised fine-tuning (`aha sft`) of `model` on `data` (cold start, SFT on RS data)."""

    kind: Literal["sft"]
    model: Ref
    """The model to fine-tune (HF folder)."""
    data: list[Ref] = Field(min_length=1)
    """`{prompt, response}` JSONL files, used together."""
    steps: int = Field(100, ge=1)
    """Optimizer steps."""
    batch: int = Field(64, ge=1)
    """Examples per step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (AdamW, cosine decay)."""
    seed: int = 0
    """Seed of the data order and the run."""


class GrpoStage(_Stage):
    """GRPO through the asynchronous loop: `aha up --model MODEL` with the stage's `[up]`,
    only its learner started, on the pipeline's bus, actors and rewarders."""

    kind: Literal["grpo"]
    model: Ref
    """The policy to start from (HF folder)."""
    dataset: Ref | None = None
    """Prompt JSONL (GSM8K / MATH-500 formats); None: the demo task."""
    max_steps: int = Field(60, ge=1)
    """GRPO steps."""
    up: dict[str, Any] = Field(default_factory=dict)
    """More `[up]` fields (`aha up`'s options: eval_problems, eval_samples, seed...); not the
    pool's (actors, rewarders, engine: the pipeline's serve every stage)."""
    parts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """The `[learner]` section (as in `aha up --config`); the actor, rewarder and bus are the
    pipeline's."""


class RsStage(_Stage):
    """Rejection sampling: `samples` (a samples file), or `k` samples per prompt from `model`."""

    kind: Literal["rs"]
    samples: Ref | None = None
    """A samples file to filter."""
    model: Ref | None = None
    """Or: the model to sample from (with `prompts` and `k`)."""
    prompts: Ref | None = None
    """The prompts to sample (`{prompt, answer}` JSONL, fields in `prompt_settings`)."""
    k: int = Field(8, ge=1)
    """Samples per prompt."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature."""
    max_tokens: int = Field(64, ge=1)
    """Longest sample."""
    sampler: Sampler = "bus"
    """`bus`: `pipeline.generate` (actors and rewarders on `[pipeline] nats_url`, or its own
    embedded ones), resumed where a killed run stopped; `local`: the HF engine in this process
    (small models)."""
    prompt_settings: PromptSettings = PromptSettings()
    """The prompt file's fields and the rewards the samples are scored with."""
    filters: FilterConfig = FilterConfig()
    """R1's filters and the mix (`aha rs`)."""
    direct: Ref | None = None
    """Non-reasoning `{prompt, response}` pairs mixed in by `filters.direct_share`."""


class EvalStage(_Stage):
    """Evaluation: `samples` with `bench` (`aha eval --samples-from`), or greedy accuracy and
    pass@1 of each of `models` on `held_out` prompts."""

    kind: Literal["eval"]
    samples: Ref | None = None
    """A samples file to score (`aha eval --samples-from`)."""
    bench: str | None = None
    """Its benchmark (`gsm8k`, `math500`, …)."""
    models: dict[Name, Ref] = Field(default_factory=dict)
    """Label -> model folder, each evaluated on `held_out`."""
    held_out: Ref | None = None
    """`{prompt, answer}` JSONL the models are evaluated on."""
    k: int = Field(4, ge=0)
    """Samples per problem for pass@1 (0: greedy only)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of pass@1's samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus mass of pass@1's samples."""
    max_tokens: int = Field(64, ge=1)
    """Longest completion."""


class DistillStage(_Stage):
    """Distillation: `teacher`'s filtered samples of `prompts`, then SFT of `student` on them."""

    kind: Literal["distill"]
    teacher: Ref
    """The model whose traces are learned (HF folder)."""
    student: Ref
    """The model trained on them (HF folder; its own tokenizer re-tokenizes the text)."""
    prompts: Ref
    """The prompts the teacher answers (`{prompt, answer}` JSONL)."""
    k: int = Field(4, ge=1)
    """Teacher samples per prompt."""
    temperature: float = Field(1.0, ge=0)
    """Teacher sampling temperature."""
    max_tokens: int = Field(64, ge=1)
    """Longest teacher sample."""
    sampler: Sampler = "bus"
    """`bus`: `pipeline.generate` (actors and rewarders on `[pipeline] nats_url`, or its own
    embedded ones), resumed where a killed run stopped; `local`: the HF engine in this process
    (small models)."""
    prompt_settings: PromptSettings = PromptSettings()
    """The prompt file's fields and the rewards the teacher's samples are scored with."""
    filters: FilterConfig = FilterConfig()
    """The rejection-sampling filters applied to the teacher's samples."""
    steps: int = Field(100, ge=1)
    """Student SFT steps."""
    batch: int = Field(64, ge=1)
    """Examples per step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate."""
    seed: int = 0
    """Seed of the sampling, the data order and the run."""


Stage = Annotated[
    SftStage | GrpoStage | RsStage | EvalStage | DistillStage, Field(discriminator="kind")
]


class DemoInputs(BaseModel):
    """The demo task's inputs, written into `<run>/demo/` before the first stage."""

    model_config = CONFIG

    cold_start: int = Field(4096, ge=1)
    """Cold-start `{prompt, response}` pairs (DEMO.md recipe B: 40 % reason, 60 % guess)."""
    rl_prompts: int = Field(2000, ge=1)
    """Training prompts (`{prompt, answer}`), for GRPO and rejection sampling."""
    direct: int = Field(512, ge=0)
    """Direct-answer pairs (`<think></think><answer>N</answer>`): the non-reasoning share."""
    held_out: int = Field(500, ge=1)
    """Held-out problems for evaluation, never trained on."""
    student_hidden: int = Field(32, ge=16)
    """Width of the student model (the teacher's is 64)."""
    head_size: Literal[16, 32] = 32
    """Attention head size of both models: 32 (the teacher's 2 heads, the student's width / 32)
    is what vLLM's CPU attention runs; 16 (DEMO.md's 4 heads of 16, the same parameters) learns
    the task far faster but needs `[pipeline] engine = "hf"`."""
    seed: int = 0
    """Seed of the data and of both models."""


class PipelineSettings(BaseModel):
    """The `[pipeline]` table."""

    model_config = CONFIG

    name: Name = "pipeline"
    """The run folder's name under `runs_dir`."""
    runs_dir: str = "runs"
    """Where run folders go (relative to the working directory)."""
    demo: DemoInputs | None = None
    """Write the demo task's inputs into `<run>/demo/` first (`$run/demo/base`, …)."""
    nats_url: str | None = None
    """The bus whose actors and rewarders sample for `rs` and `distill` stages (they must be
    allowed to serve those models: `actor.model_dirs`); None: the pipeline starts one server,
    actor and rewarder for all of them (at the first such stage, in `<run>/bus/`)."""
    engine: Literal["vllm", "hf"] | None = None
    """The engine of that actor; None: vLLM when installed, else the HF reference."""
    parallel: int = Field(1, ge=1)
    """Stages that may run at once. A stage starts when every stage it refers to (`@name`) is
    done, earlier stages of the file first; the stages on the pipeline's bus (grpo, and rs or
    distill sampled with `sampler = "bus"`) run one at a time, in the file's order. A stage's
    processes use one thread each (`OMP_NUM_THREADS=1`): on a CPU machine, up to its cores;
    on GPUs, what their memory holds at once."""


def pool_engine(settings: PipelineSettings) -> str:
    """The engine of the pipeline's own actor: `[pipeline] engine`, else vLLM when installed."""
    return settings.engine or ("vllm" if importlib.util.find_spec("vllm") else "hf")


class Recipe(BaseModel):
    """A recipe file."""

    model_config = CONFIG

    pipeline: PipelineSettings = PipelineSettings()
    """Where the run goes, and the demo inputs."""
    stages: list[Stage] = Field(min_length=1)
    """The stages, run in order."""


# -- reading and checking ---------------------------------------------------------------------


def load_recipe(path: str | Path, name: str | None = None) -> Recipe:
    """The recipe at `path` (`name` overrides `[pipeline] name`); `ConfigError` naming the
    file and the stage field for anything wrong in it."""
    data = read_file(path)
    if name is not None:
        data.setdefault("pipeline", {})["name"] = name
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{_where(data, e.errors()[0])} ({path})") from None
    seen: set[str] = set()
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            raise ConfigError(f"stages.{i} ({stage.name}).name: used twice ({path})")
        seen.add(stage.name)
    return recipe


def _where(data: dict, error: dict) -> str:
    """`stages.2 (grpo-1).model: Field required`: the stage named by its name."""
    loc = [str(p) for p in error["loc"]]
    if len(loc) >= 2 and loc[0] == "stages" and loc[1].isdigit():
        stages = data.get("stages") or []
        i = int(loc[1])
        label = stages[i].get("name") if i < len(stages) and isinstance(stages[i], dict) else None
        loc = [f"stages.{i}" + (f" ({label})" if label else "")] + [
            p for p in loc[2:] if p not in {"sft", "grpo", "rs", "eval", "distill"}
        ]
    message = error["msg"]
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("kind")
        kind = error["input"].get("kind") if isinstance(error["input"], dict) else None
        message = f"unknown stage kind {kind!r}; one of sft, grpo, rs, eval, distill"
    return f"{'.'.join(loc)}: {message}"


class Run:
    """A recipe bound to its run folder: resolves references, hashes, records."""

    def __init__(self, recipe: Recipe, recipe_file: Path):
        self.recipe = recipe
        self.file = recipe_file
        self.dir = (Path(recipe.pipeline.runs_dir) / recipe.pipeline.name).resolve()
        self.stages = {s.name: s for s in recipe.stages}
        self.resuming: set[str] = set()
        """Stages continued in their folder (killed midway with the same fingerprint)."""
        self.bus = SamplingBus(self)
        """The server, actor and rewarder the bus-sampled stages share."""

    def stage_dir(self, name: str) -> Path:
        return self.dir / name

    def record_path(self, name: str) -> Path:
        return self.dir / "stages" / f"{name}.json"

    def output(self, stage) -> Path:
        """The stage's main output: a model folder, the SFT pairs, or the eval summary."""
        folder = self.stage_dir(stage.name)
        return {
            "sft": folder / "model",
            "grpo": folder / "final",
            "distill": folder / "model",
            "rs": folder / "rs.jsonl",
            "eval": folder / "summary.json",
        }[stage.kind]

    def resolve(self, ref: str) -> Path:
        """The path `ref` names (see the module docstring); references are checked already."""
        if ref.startswith("@"):
            name, _, rest = ref[1:].partition("/")
            stage = self.stages[name]
            return self.stage_dir(name) / rest if rest else self.output(stage)
        if ref == "$run" or ref.startswith("$run/"):
            return self.dir / ref[len("$run/") :]
        return (self.file.parent / ref).resolve()

    def refs(self, stage) -> dict[str, str]:
        """Every input reference of `stage`, by field (`data.0`, `models.rl`, …)."""
        out: dict[str, str] = {}
        for field in (*MODEL_FIELDS, "samples", "prompts", "dataset", "held_out", "direct"):
            value = getattr(stage, field, None)
            if value is not None:
                out[field] = value
        for i, value in enumerate(getattr(stage, "data", []) or []):
            out[f"data.{i}"] = value
        for label, value in (getattr(stage, "models", {}) or {}).items():
            out[f"models.{label}"] = value
        return out

    def check(self, demo_written: bool = False) -> None:
        """Raise `ConfigError` for a reference to a stage not run before, or an input that is
        not there (files of earlier stages are not looked for, nor `$run/…` ones before the
        demo inputs are written)."""
        self._check_demo()
        done: list[str] = []
        demo = self.recipe.pipeline.demo is not None and not demo_written
        for i, stage in enumerate(self.recipe.stages):
            where = f"stages.{i} ({stage.name})"
            _check_stage_fields(stage, where, self.file)
            for field, ref in self.refs(stage).items():
                wants_model = field.split(".")[0] in MODEL_FIELDS or field.startswith("models.")
                if ref.startswith("@"):
                    self._check_reference(where, field, ref, done, wants_model)
                    continue
                if ref.startswith("$run") and demo:
                    continue  # written by the demo inputs (checked when they are)
                path = self.resolve(ref)
                if wants_model and not (path / "config.json").is_file():
                    raise ConfigError(
                        f"{where}.{field}: no model at {path} (no config.json) ({self.file})"
                    )
                if not wants_model and not path.is_file():
                    raise ConfigError(f"{where}.{field}: no such file: {path} ({self.file})")
            done.append(stage.name)

    def _check_demo(self) -> None:
        """The demo models' head size: one the student's width divides, and 16 only on the
        HF engine (vLLM's CPU attention has no kernel for heads of 16)."""
        settings = self.recipe.pipeline
        if settings.demo is None:
            return
        size = settings.demo.head_size
        if settings.demo.student_hidden % size:
            raise ConfigError(
                f"pipeline.demo.student_hidden: {settings.demo.student_hidden} is not a "
                f"multiple of head_size {size} ({self.file})"
            )
        if size == 16 and settings.nats_url is None and pool_engine(settings) != "hf":
            raise ConfigError(
                f'pipeline.demo.head_size: heads of 16 need [pipeline] engine = "hf" '
                f"(vLLM's CPU attention has no kernel for them) ({self.file})"
            )

    def _check_reference(
        self, where: str, field: str, ref: str, done: list[str], wants_model: bool
    ) -> None:
        """`@stage[/file]` names a stage run before this one, and a model where one is wanted."""
        name, _, rest = ref[1:].partition("/")
        if name not in done:
            later = "a later stage" if name in self.stages else "no stage"
            raise ConfigError(f"{where}.{field}: {ref!r} refers to {later} ({self.file})")
        kind = self.stages[name].kind
        if not rest and wants_model != (kind in MODEL_KINDS):
            output = "a model, not a file" if kind in MODEL_KINDS else "a file, not a model"
            raise ConfigError(
                f"{where}.{field}: {ref!r} is the output of {kind} stage {name!r}: {output} ({self.file})"
            )


def _check_stage_fields(stage, where: str, file: Path) -> None:
    """The either/or fields of rs and eval stages, and the grpo stage's `[up]` fields."""
    if stage.kind == "rs" and (stage.samples is None) == (stage.model is None):
        raise ConfigError(f"{where}: give samples, or model with prompts ({file})")
    if stage.kind == "rs" and stage.model is not None and stage.prompts is None:
        raise ConfigError(f"{where}.prompts: required with model ({file})")
    if stage.kind == "eval" and (stage.samples is None) == (not stage.models):
        raise ConfigError(f"{where}: give samples with bench, or models with held_out ({file})")
    if stage.kind == "eval" and stage.samples is not None and stage.bench is None:
        raise ConfigError(f"{where}.bench: required with samples ({file})")
    if stage.kind == "eval" and stage.models and stage.held_out is None:
        raise ConfigError(f"{where}.held_out: required with models ({file})")
    if stage.kind == "eval" and stage.bench is not None:
        from pipeline.benchmarks import get_benchmark

        try:
            get_benchmark(stage.bench)
        except ConfigError as e:
            raise ConfigError(f"{where}.bench: {e} ({file})") from None
    if stage.kind == "grpo":
        from deploy.runconfig import UpConfig

        fixed = {"model", "dataset", "name", "runs_dir", "resume"} & set(stage.up)
        if fixed:
            raise ConfigError(f"{where}.up.{sorted(fixed)[0]}: set by the stage itself ({file})")
        pool = sorted(POOL_FIELDS & set(stage.up)) + [
            f"parts.{p}" for p in sorted(set(stage.parts) - {"learner"})
        ]
        if pool:
            field = pool[0] if pool[0].startswith("parts.") else f"up.{pool[0]}"
            raise ConfigError(
                f"{where}.{field}: the pipeline's one bus, actor and rewarder serve every stage "
                f"([pipeline] engine, nats_url) ({file})"
            )
        try:
            UpConfig.model_validate({**stage.up, "model": "m"})
        except ValidationError as e:
            error = e.errors()[0]
            loc = ".".join(map(str, error["loc"]))
            raise ConfigError(f"{where}.up.{loc}: {error['msg']} ({file})") from None


# -- hashing and records ----------------------------------------------------------------------


def hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*") if p.is_file())
    for name, file in files:
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none, or half-written by a killed run: the stage runs again


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def fingerprint(run: Run, stage, output_hashes: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(the stage's fingerprint, its inputs' hashes): its settings plus every input's
    content, an earlier stage's output by the hash recorded when that stage finished."""
    inputs: dict[str, str] = {}
    for field, ref in run.refs(stage).items():
        if ref.startswith("@") and "/" not in ref:
            inputs[field] = output_hashes[ref[1:]]
            continue
        path = run.resolve(ref)
        if not path.exists():  # `@stage/file` that the stage did not write
            raise ConfigError(f"{stage.name}.{field}: {ref!r} is not there ({path})")
        inputs[field] = hash_path(path)
    settings = stage.model_dump(mode="json")
    text = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), inputs


def is_done(record: dict | None, fp: str, output: Path) -> bool:
    """A record of a finished run of the same fingerprint whose output is still as written."""
    return (
        record is not None
        and record.get("status") == "done"
        and record.get("fingerprint") == fp
        and output.exists()
        and hash_path(output) == record.get("output_hash")
    )


class SamplingBus:
    """One NATS server, actor and rewarder for every bus-sampled stage of a run, started at
    the first one and stopped when the run ends. The actor may serve the models those stages
    name (`actor.model_dirs`: the run folder and the models outside it) and switches between
    them without a restart."""

    def __init__(self, run: Run):
        self.run = run
        self._url: str | None = run.recipe.pipeline.nats_url
        self._stack = contextlib.ExitStack()
        self._supervisor = None

    def url(self, model: Path, max_tokens: int) -> str:
        """The bus's URL, starting it (serving `model` first) if it is not running."""
        if self._url is None:
            self._start(model, max_tokens)
        elif self._supervisor is not None:
            self._check()
        return self._url

    def _start(self, model: Path, max_tokens: int) -> None:
        import asyncio

        from deploy.supervisor import Part, Supervisor
        from protocol.bus import Bus
        from protocol.config import BusConfig
        from protocol.messages import payload_limit
        from protocol.server import NatsServer

        folder = self.run.dir / "bus"
        limit = max(payload_limit(16, max(max_tokens, 4096)), 8 << 20)
        server = self._stack.enter_context(NatsServer(folder / "nats", max_payload=limit))
        engine = pool_engine(self.run.recipe.pipeline)
        config = folder / "aha.toml"
        actor = {"model": str(model), "backend": engine, "model_dirs": self.model_dirs()}
        sections = {"bus": {"url": server.url}, "actor": actor, "rewarder": {}}
        config.write_text(tomli_w.dumps(sections))

        async def setup() -> None:  # the streams, before any part or job uses them
            await (await Bus.connect(BusConfig(url=server.url), name="aha-pipeline")).close()

        asyncio.run(setup())
        supervisor = Supervisor(folder / "logs")
        supervisor.watch_server(server)
        self._stack.callback(supervisor.stop, grace_s=10.0)
        aha = [sys.executable, "-m", "deploy.cli"]
        env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for name in ("actor", "rewarder"):
            argv = [*aha, name, "--config", str(config)]
            supervisor.start(Part(f"{name}-0", argv, env, restart=True, stop_order=0))
        self._supervisor, self._url = supervisor, server.url
        log().info("sampling bus", url=server.url, engine=engine, logs=str(folder / "logs"))

    def model_dirs(self) -> list[str]:
        """What the actor may serve: the run folder (every stage's output, the grpo stages'
        evaluation folders) and each model a bus-sampled or grpo stage names outside it."""
        dirs = {str(self.run.dir)}
        for stage in self.run.recipe.stages:
            ref = getattr(stage, "teacher", None) or getattr(stage, "model", None)
            bus = stage.kind == "grpo" or getattr(stage, "sampler", None) == "bus"
            if stage.kind in ("rs", "distill", "grpo") and bus and ref:
                dirs.add(str(self.run.resolve(ref)))
        return sorted(dirs)

    def clear_training(self) -> None:
        """Nothing of an earlier grpo stage's learner left on the bus: its scored groups (they
        would reach the next learner as foreign groups) and weight versions (the next learner
        counts from 0 again, and the store keeps the highest numbers); on the pipeline's own
        server also its tasks and rollouts (an external one may carry other jobs')."""
        import asyncio

        from nats.js.errors import NotFoundError

        from protocol.bus import Bus
        from protocol.config import BusConfig
        from protocol.names import (
            JOB_TRAIN,
            OBJECT_STORE_WEIGHTS,
            ROLLOUTS,
            STREAM_SCORED,
            TASKS,
            scored_subject,
        )

        async def clear() -> None:
            bus = await Bus.connect(BusConfig(url=self._url), name="aha-pipeline")
            try:
                if self._supervisor is not None:
                    for stream in (TASKS.stream, ROLLOUTS.stream):
                        await bus.js.purge_stream(stream)
                await bus.js.purge_stream(STREAM_SCORED, subject=scored_subject(JOB_TRAIN))
                store = await bus.js.object_store(OBJECT_STORE_WEIGHTS)
                with contextlib.suppress(NotFoundError):  # an empty store
                    for info in await store.list(ignore_deletes=True):
                        await store.delete(info.name)
            finally:
                await bus.close()

        try:
            asyncio.run(clear())
        except Exception as e:  # a bus whose user may not purge: leftovers are dead-lettered
            log().warning("could not clear the earlier learner's leftovers", error=repr(e))

    def _check(self) -> None:
        """Restart a part that died since the last stage (the supervisor's restart budget)."""
        self._supervisor.poll()

    def close(self) -> None:
        self._stack.close()


# -- running the stages ----------------------------------------------------------------------


def _sft(run: Run, stage: SftStage, folder: Path) -> dict[str, Any]:
    data = [run.resolve(d) for d in stage.data]
    args = (stage.steps, stage.batch, stage.lr, stage.seed)
    return run_sft(folder, run.resolve(stage.model), data, run.output(stage), *args)


def _grpo(run: Run, stage: GrpoStage, folder: Path) -> dict[str, Any]:
    """`aha up` with only its learner, on the pipeline's bus: the pool's actor takes the
    learner's policy with its first task (`Task.policy`) and the next stage's model after it."""
    from protocol.config import merge

    model = run.resolve(stage.model)
    dataset = (stage.parts.get("learner") or {}).get("dataset")
    max_tokens = dataset.get("max_tokens") if isinstance(dataset, dict) else None
    url = run.bus.url(model, max_tokens if isinstance(max_tokens, int) else 1024)
    resume = stage.name in run.resuming  # the learner's checkpoint, the queues as they are
    if not resume:
        run.bus.clear_training()  # what an earlier grpo stage left
    up = {
        **stage.up,
        "model": str(model),
        "name": stage.name,
        "runs_dir": str(run.dir),
        "resume": resume,
        "actors": 0,  # the pipeline's serve it
        "rewarders": 0,
    }
    if stage.dataset is not None:
        up["dataset"] = str(run.resolve(stage.dataset))
    parts = merge(stage.parts, {"learner": {"max_steps": stage.max_steps}, "bus": {"url": url}})
    config = run.dir / f"{stage.name}.up.toml"
    config.write_text(tomli_w.dumps({**parts, "up": up}))
    run_command(["up", "--config", str(config), "--json"], run.dir / "logs" / f"{stage.name}.log")
    run.bus.clear_training()  # its tasks still queued would keep the actor busy for nothing
    summary = json.loads((folder / "summary.json").read_text())
    if not (folder / "final" / "config.json").is_file():
        raise StageFailed(f"aha up ended {summary.get('ended')!r} without a final model")
    keys = ("accuracy_before", "accuracy_after", "pass_at_1_before", "pass_at_1_after")
    keys += ("length_before", "length_after", "steps", "rl_seconds")
    return {k: summary.get(k) for k in keys}


def _rs(run: Run, stage: RsStage, folder: Path) -> dict[str, Any]:
    from pipeline.rs import run_rs

    out = run.output(stage)
    direct = run.resolve(stage.direct) if stage.direct else None
    samples = run.resolve(stage.samples) if stage.samples else None
    filters = stage.filters
    if samples is None:
        samples = sample_teacher(
            run,
            run.resolve(stage.model),
            run.resolve(stage.prompts),
            folder / "samples.jsonl",
            stage,
        )
        filters = filters.model_copy(update={"rewards": None})  # scored as they were sampled
    report = run_rs(samples, out, filters, direct=direct, workers=1)
    return {k: report[k] for k in ("problems", "samples", "kept", "direct", "dropped")}


def _eval(run: Run, stage: EvalStage, folder: Path) -> dict[str, Any]:
    out = run.output(stage)
    if stage.samples is not None:
        argv = ["eval", "--samples-from", str(run.resolve(stage.samples)), "--bench", stage.bench]
        run_command([*argv, "-o", str(folder / "eval"), "--workers", "1"], folder / "eval.log")
        shutil.copy(folder / "eval" / "summary.json", out)
        return json.loads(out.read_text())
    from pipeline.heldout import evaluate
    from protocol.config import read_jsonl

    rows = [row for _, row in read_jsonl(run.resolve(stage.held_out))]
    results = {}
    for label, ref in stage.models.items():
        sampling = {"samples": stage.k, "temperature": stage.temperature, "top_p": stage.top_p}
        result = evaluate(run.resolve(ref), rows, max_tokens=stage.max_tokens, **sampling)
        results[label] = result.as_dict() | sampling
        log().info("evaluated", stage=stage.name, model=label, **results[label])
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _distill(run: Run, stage: DistillStage, folder: Path) -> dict[str, Any]:
    return distill(
        run.resolve(stage.teacher),
        run.resolve(stage.student),
        run.resolve(stage.prompts),
        folder,
        run.output(stage),
        stage,
        run,
    )


RUNNERS = {"sft": _sft, "grpo": _grpo, "rs": _rs, "eval": _eval, "distill": _distill}
"""How each kind of stage runs: (run, stage, its folder) -> its result (a JSON object)."""


def write_demo_inputs(run: Run) -> None:
    """The demo task's models and data in `<run>/demo/`, each written once (deterministic)."""
    from pipeline import demo
    from pipeline.tiny_model import TinySpec, save_tiny_model

    spec = run.recipe.pipeline.demo
    folder = run.dir / "demo"
    if (folder / "done").exists():
        return
    held = demo.held_out(spec.held_out)
    exclude = {r["prompt"] for r in held}
    demo.write_jsonl(held, folder / "held_out.jsonl")
    demo.write_jsonl(
        demo.cold_start(spec.cold_start, seed=spec.seed + 2, exclude=exclude),
        folder / "cold_start.jsonl",
    )
    rl = demo.rl_prompts(spec.rl_prompts + spec.direct, seed=spec.seed + 1, exclude=exclude)
    demo.write_jsonl(rl[: spec.rl_prompts], folder / "rl.jsonl")
    direct = [
        {"prompt": r["prompt"], "response": demo.response("", r["answer"])}
        for r in rl[spec.rl_prompts :]
    ]
    demo.write_jsonl(direct, folder / "direct.jsonl")
    heads = 64 // spec.head_size
    save_tiny_model(folder / "base", TinySpec(seed=spec.seed, num_heads=heads, num_kv_heads=heads))
    heads = spec.student_hidden // spec.head_size
    student = TinySpec(
        seed=spec.seed,
        hidden_size=spec.student_hidden,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=3 * spec.student_hidden,
    )
    save_tiny_model(folder / "student", student)
    (folder / "done").write_text("")


def dependencies(run: Run, stage) -> set[str]:
    """The stages `stage` refers to (`@name`, `@name/file`)."""
    refs = run.refs(stage).values()
    return {ref[1:].partition("/")[0] for ref in refs if ref.startswith("@")}


def uses_bus(stage) -> bool:
    """Whether `stage` runs on the pipeline's bus (its one actor serves one policy at a time)."""
    if stage.kind == "grpo":
        return True
    sampled = stage.kind == "distill" or (stage.kind == "rs" and stage.model is not None)
    return sampled and stage.sampler == "bus"


def startable(run: Run, pending: list, done: set[str], running: list, parallel: int) -> list:
    """The pending stages to start now, in the recipe's order: those whose references are all
    `done`, as many as `parallel` leaves room for beside `running`; on the bus one at a time
    and in the file's order (a later stage never takes the actor from an earlier one, which
    would wait for it)."""
    chosen: list = []
    busy = any(uses_bus(s) for s in running)
    for stage in pending:
        if len(running) + len(chosen) >= parallel:
            break
        ready = dependencies(run, stage) <= done
        if uses_bus(stage):
            if ready and not busy:
                chosen.append(stage)
            busy = True  # started now, or waiting: the later bus stages wait behind it
        elif ready:
            chosen.append(stage)
    return chosen


def run_stage(run: Run, stage, output_hashes: dict[str, str], resume: bool) -> dict[str, Any]:
    """Run `stage` unless `resume` finds it done and unchanged; returns its record."""
    fp, inputs = fingerprint(run, stage, output_hashes)
    record_file = run.record_path(stage.name)
    record = read_record(record_file)
    output = run.output(stage)
    if resume and is_done(record, fp, output):
        log().info("stage done and unchanged: skipped", stage=stage.name, kind=stage.kind)
        return {**record, "skipped": True}
    attempts = (record or {}).get("attempts", 0) + 1
    folder = run.stage_dir(stage.name)
    killed = record is not None and record.get("status") == "running"
    if resume and killed and record.get("fingerprint") == fp:
        run.resuming.add(stage.name)  # generate continues its file, aha up its checkpoint
    else:
        shutil.rmtree(folder, ignore_errors=True)  # another stage's leftovers: start clean
    folder.mkdir(parents=True, exist_ok=True)
    base = {"name": stage.name, "kind": stage.kind, "fingerprint": fp, "inputs": inputs}
    base["settings"] = stage.model_dump(mode="json")
    base["attempts"] = attempts
    base["started"] = time.time()
    write_record(record_file, {**base, "status": "running"})
    log().info("stage", stage=stage.name, kind=stage.kind, attempt=attempts)
    started = time.monotonic()
    try:
        result = RUNNERS[stage.kind](run, stage, folder)
    except Exception as e:  # recorded, then one line from the command; --resume reruns it
        failed = {"status": "failed", "ended": time.time(), "error": str(e)[-2000:]}
        write_record(record_file, {**base, **failed})
        if isinstance(e, ConfigError):
            raise ConfigError(f"{stage.name}: {e}") from e
        raise StageFailed(f"stage {stage.name} ({stage.kind}) failed: {e}") from e
    record = {
        **base,
        "status": "done",
        "ended": time.time(),
        "seconds": round(time.monotonic() - started, 1),
        "output": str(output),
        "output_hash": hash_path(output),
        "result": result,
    }
    write_record(record_file, record)
    return {**record, "skipped": False}


def run_stages(run: Run, resume: bool) -> list[dict[str, Any]]:
    """Every stage (each skipped when `resume` finds it done and unchanged), up to
    `[pipeline] parallel` at once; after a failure no other starts, the running ones finish,
    then the first failure is raised. Records in the recipe's order."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    parallel = run.recipe.pipeline.parallel
    records: dict[str, dict[str, Any]] = {}
    pending, running, failure = list(run.recipe.stages), {}, None
    # The bus is started by the first stage that needs it, in a pool thread, and its server
    # and parts get a signal when that thread ends: the pool's threads live until the pool
    # shuts down, and the bus closes before that.
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="stage")
    with pool, contextlib.closing(run.bus):
        try:
            while running or (pending and failure is None):
                for stage in startable(run, pending, set(records), [*running.values()], parallel):
                    pending.remove(stage)
                    hashes = {name: r["output_hash"] for name, r in records.items()}
                    running[pool.submit(run_stage, run, stage, hashes, resume)] = stage
                if not running:
                    raise RuntimeError(f"no stage can start: {[s.name for s in pending]}")
                for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                    stage = running.pop(future)
                    try:
                        records[stage.name] = future.result()
                    except Exception as e:
                        failure = failure or e
        except BaseException:  # Ctrl-C, SIGTERM: every running stage's command stops too
            stop_children()
            raise
    if failure is not None:
        raise failure
    keys = ("skipped", "seconds", "attempts")
    return [
        {"name": s.name, "kind": s.kind, **{k: records[s.name][k] for k in keys}}
        | {"outputs": records[s.name]["output"], "result": records[s.name]["result"]}
        for s in run.recipe.stages
    ]


def run_recipe(run: Run, resume: bool) -> dict[str, Any]:
    """Every stage in order; the summary (also in `<run>/summary.json`)."""
    started = time.monotonic()
    if run.recipe.pipeline.demo is not None:
        write_demo_inputs(run)
        run.check(demo_written=True)
    stages = run_stages(run, resume)
    summary = {
        "name": run.recipe.pipeline.name,
        "run_dir": str(run.dir),
        "wall_seconds": round(time.monotonic() - started, 1),
        "stages": stages,
        "findings": findings(stages),
    }
    plot = plot_findings(summary["findings"], run.dir / "findings.png")
    summary["plot"] = str(plot) if plot else None
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_findings(findings: dict[str, Any], path: Path) -> Path | None:
    """pass@1 (what the findings are judged on), greedy accuracy and thinking share of every
    evaluated model, as bars in a PNG; None without held-out evaluations."""
    models = {label: f for label, f in findings.items() if label != "r1"}
    if not models:
        return None
    import matplotlib  # only a run with evaluations draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(models.values()))
    sampled = f"pass@1 (T={first.get('temperature') or 1:g}, k={first.get('samples') or 0})"
    bars = [("pass_at_1", sampled), ("accuracy", "greedy accuracy")]
    bars.append(("thinking_share", "thinking share (greedy)"))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models)), 4))
    width = 0.8 / len(bars)
    for i, (key, title) in enumerate(bars):
        values = [models[label].get(key) or 0.0 for label in models]
        ax.bar([x + i * width for x in range(len(models))], values, width, label=title)
    ax.set_xticks([x + width for x in range(len(models))], list(models), rotation=20)
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(bars), fontsize=8)
    ax.set_title("held-out evaluation of every model of the recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def findings(stages: list[dict]) -> dict[str, Any]:
    """Greedy accuracy and pass@1 of every model the recipe's held-out evals measured, by
    label (R1's findings compare these: cold start, after RL, SFT on filtered and on
    unfiltered RS data, the distilled student, the student trained by RL alone)."""
    out: dict[str, Any] = {}
    keep = ("accuracy", "pass_at_1", "mean_length", "thinking_share", "samples", "temperature")
    for stage in stages:
        if stage["kind"] != "eval":
            continue
        for label, value in stage["result"].items():
            if isinstance(value, dict) and "accuracy" in value:
                out[label] = {k: value.get(k) for k in (*keep, "top_p")}
    checks = r1_findings(out)
    return {**out, "r1": checks} if checks else out


EPS = 1e-9
"""Accuracies are shares of the held-out set: 0.3 - 0.2 is 0.1 up to float rounding."""
FINDING_LABELS = ("cold_start", "rl", "sft_rs", "sft_unfiltered", "distilled", "student_rl")
"""The eval labels R1's three findings compare (the demo recipe's)."""


def r1_findings(models: dict[str, dict]) -> dict[str, bool] | None:
    """R1's findings (issue 11, section 5) judged on held-out pass@1, when an eval measured it
    for every model they compare: RL improves reasoning (pass@1, greedy accuracy, length and
    thinking share up); SFT of the base on filtered RS data keeps the gain (pass@1 at least the
    cold start's + 0.2 and SFT on unfiltered samples' + 0.1); the distilled student beats the
    same student trained by RL alone.

    pass@1, not greedy accuracy: greedy decoding takes each token's mode, which is right even
    for a model that imitated mostly wrong samples (the unfiltered control), so it cannot see
    what the filters change; pass@1 averages over the distribution the model learned."""
    if not all(models.get(label, {}).get("pass_at_1") is not None for label in FINDING_LABELS):
        return None
    p = {label: models[label]["pass_at_1"] for label in FINDING_LABELS}
    cold, rl = models["cold_start"], models["rl"]
    return {
        "rl_improves_reasoning": p["rl"] > p["cold_start"]
        and rl["accuracy"] > cold["accuracy"]
        and rl["mean_length"] > cold["mean_length"]
        and rl["thinking_share"] > cold["thinking_share"],
        "sft_on_filtered_rs_keeps_the_gain": p["sft_rs"] - p["cold_start"] >= 0.2 - EPS
        and p["sft_rs"] - p["sft_unfiltered"] >= 0.1 - EPS,
        "distillation_beats_rl_on_the_student": p["distilled"] > p["student_rl"],
    }


def demo_recipe() -> Path:
    """The recipe `aha pipeline --demo` runs."""
    return Path(__file__).resolve().parent.parent / "recipes" / "r1-demo.toml"


def main(args) -> int:
    """The `aha pipeline` command."""
    if (args.recipe is None) == (not args.demo):
        raise ConfigError("give a recipe file, or --demo")
    path = Path(demo_recipe() if args.demo else args.recipe)
    recipe = load_recipe(path, args.name)
    run = Run(recipe, path.resolve())
    run.check()
    records = list((run.dir / "stages").glob("*.json")) if (run.dir / "stages").is_dir() else []
    if records and not args.resume:
        raise ConfigError(
            f"the run folder has stage records; --resume continues it, --name starts another "
            f"({run.dir})"
        )
    from protocol.log import setup_logging

    setup_logging("pipeline")
    run.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(ValueError):  # SIGTERM as Ctrl-C: the child stage stops too
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = run_recipe(run, args.resume)
    except StageFailed as e:
        print(f"aha pipeline: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    """Stages and findings as rich tables on stderr (stdout is for `--json`)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"pipeline {summary['name']}: {summary['wall_seconds']} s")
    for column in ("stage", "kind", "seconds", "output"):
        table.add_column(column)
    for s in summary["stages"]:
        seconds = "skipped" if s["skipped"] else f"{s['seconds']}"
        table.add_row(s["name"], s["kind"], seconds, s["outputs"])
    console.print(table)
    if summary["findings"]:
        table = Table(title="held-out evaluation (R1's findings are judged on pass@1)")
        for column in ("model", "greedy accuracy", "pass@1", "length", "thinking share"):
            table.add_column(column)
        for label, f in summary["findings"].items():
            if label == "r1":
                continue
            cells = [f["accuracy"], f["pass_at_1"], f["mean_length"], f["thinking_share"]]
            table.add_row(label, *("-" if c is None else f"{c:.3f}" for c in cells))
        console.print(table)
    for finding, holds in (summary["findings"].get("r1") or {}).items():
        console.print(f"{finding.replace('_', ' ')}: {'yes' if holds else 'NO'}")
