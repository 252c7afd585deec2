"""`LearnerConfig`: the `[learner]` section of the aha config (torch-free, so `--help` is instant)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from protocol.config import CONFIG, BusConfig
from protocol.tracking import TrackingConfig
from protocol.weight_server import WeightServerConfig


class ModelConfig(BaseModel):
    """Where the policy's initial weights come from: an HF folder, or a fresh Qwen2 from a config."""

    model_config = CONFIG

    path: str | None = None
    """HF causal-LM folder (config.json + safetensors + tokenizer), loaded with `from_pretrained`."""
    qwen2: dict[str, Any] | None = None
    """`transformers.Qwen2Config` arguments for a randomly initialised model (tests, demos)."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.qwen2 is None):
            raise ValueError("set exactly one of model.path and model.qwen2")
        return self


class OptimConfig(BaseModel):
    """AdamW (torch's, not DeepSpeed's JIT-compiled FusedAdam/CPUAdam) and its LR schedule."""

    model_config = CONFIG

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam β1, β2."""
    eps: float = Field(1e-8, gt=0)
    """Adam ε, added to the root of the second moment."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled (AdamW) weight decay, applied to every parameter."""
    schedule: Literal["constant", "cosine"] = "constant"
    """LR after warmup: constant, or cosine decay to `min_lr_ratio · lr` at `total_steps`."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from `lr / warmup_steps` to `lr`."""
    total_steps: int | None = Field(None, ge=1)
    """Length of the cosine schedule in optimizer steps (warmup included). None: the run's,
    `max_steps × grpo.ppo_epochs × grpo.minibatches` (a cosine needs one or the other)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Where the cosine ends, as a fraction of `lr`."""


class DeepSpeedConfig(BaseModel):
    """How DeepSpeed runs the policy: ZeRO stage, precision, micro-batches, clipping."""

    model_config = CONFIG

    zero_stage: int = Field(0, ge=0, le=3)
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + parameters."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Compute dtype (master weights stay fp32). Use fp32 on CPUs without native bf16."""
    micro_batch: int = Field(4, ge=1)
    """Completions per forward/backward on one rank; an update accumulates as many as the batch needs."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping."""


class GRPOConfig(BaseModel):
    """The loss (DESIGN.md "GRPO" and "The off-policy bound")."""

    model_config = CONFIG

    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower PPO clip: the ratio π_θ/π_old is kept above 1 − eps_low."""
    eps_high: float = Field(0.2, ge=0)
    """Upper PPO clip: the ratio is kept below 1 + eps_high (DAPO's clip-higher uses 0.28)."""
    beta: float = Field(0.04, ge=0)
    """Weight of the k3 KL penalty to the frozen reference; 0 loads no reference model."""
    is_cap: float | None = Field(2.0, gt=0)
    """C in the truncated importance weight min(π_old/μ, C); None disables the weight."""
    mode: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    """How per-token losses are averaged: GRPO, DAPO (token-mean) or Dr. GRPO."""
    scale: Literal["std", "none"] = "std"
    """Advantage scale: divide by the group's std (GRPO) or not (Dr. GRPO)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each batch (GRPO's μ), all against the same π_old."""
    minibatches: int = Field(1, ge=1)
    """Parts each pass cuts the batch into, one optimizer step each (PPO's minibatches): a
    batch makes `ppo_epochs × minibatches` optimizer steps."""
    shuffle_rewards: bool = False
    """Control experiment: permute the rewards across the batch before the advantages, so
    they no longer belong to their completions. Nothing should be learned (DEMO.md); a run
    that still improves learns from something other than the reward."""


TEMPLATES = ("r1-zero", "chat", "none")


class DatasetSource(BaseModel):
    """One more prompt file mixed into the dataset (`[[learner.dataset.sources]]`)."""

    model_config = CONFIG

    path: str
    """JSONL, Parquet (`.parquet`) or Arrow (`.arrow`, or a `save_to_disk` folder) file."""
    weight: float = Field(1.0, gt=0)
    """Its share of the mixture, relative to the other sources' weights and the dataset's."""
    prompt_field: str | None = None
    """Field of the problem text; None: the dataset's `prompt_field`."""
    answer_field: str | None = None
    """Field of the reference; None: the dataset's `answer_field`."""
    rewards: dict[str, float] | None = Field(None, min_length=1)
    """Rewards of its tasks (where a row names none); None: the dataset's."""
    meta: dict[str, Any] | None = None
    """Task meta of its tasks (where a row has none); None: the dataset's."""


class DatasetConfig(BaseModel):
    """The prompt dataset the dispatcher issues tasks from, and how each task is sampled and scored."""

    model_config = CONFIG

    path: str
    """Prompt file, one problem per row: JSONL (GSM8K `question`/`answer`, MATH-500
    `problem`/`answer`, ...), Parquet (`.parquet`) or Arrow (`.arrow`, or a folder written by
    `datasets`' `save_to_disk`). A row's own `rewards` and `meta` objects, where present, are
    its task's instead of the dataset's (code tests, a target language)."""
    weight: float = Field(1.0, gt=0)
    """The share of `path` in a mixture with `sources`."""
    sources: list[DatasetSource] = Field(default_factory=list)
    """More prompt files, mixed with `path` by weight: each pass over the data holds
    `round(mix_size × weight / total weight)` rows of each (its rows in a seeded order,
    repeated where it has fewer)."""
    mix_size: int | None = Field(None, ge=1)
    """Rows in one pass over a mixture; None: all the files' rows together."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Longest prompt, in tokens where the learner tokenizes prompts (an HF model folder), else
    in characters; longer rows are left out, counted and logged, not issued."""
    prompt_field: str = "question"
    """JSON field holding the problem text."""
    answer_field: str = "answer"
    """JSON field holding the reference the rewards compare with (passed on as it is)."""
    template: Literal["r1-zero", "chat", "none"] = "r1-zero"
    """How the problem becomes a prompt: the R1-Zero template, the model's chat template, or as it is."""
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"accuracy_gsm8k": 1.0, "format_think": 0.1}, min_length=1
    )
    """Reward function name -> weight, copied into every task (rewarders compute the weighted sum)."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Task context copied into every task for the rewards, e.g. `{"answer_tag": true}`."""
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt (GRPO needs at least 2 to compare)."""
    max_tokens: int = Field(256, ge=1)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner scores tokens under the same tempered distribution."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass; below 1 the behaviour policy differs from π (the IS weight corrects it)."""
    seed: int = 0
    """Seed of the shuffled prompt order (one fresh permutation per pass over the data)."""


class EvalConfig(BaseModel):
    """`[learner.eval]`: an evaluation job on the same actors every N steps (`learner.evaluation`)."""

    model_config = CONFIG

    every_steps: int = Field(0, ge=0)
    """After every this many steps (once that version is published), issue an eval job; 0: never."""
    benchmarks: list[str] = Field(default_factory=list)
    """Shipped benchmarks (`aha eval --bench` names) to evaluate."""
    k: int = Field(4, ge=1)
    """Samples per problem."""
    limit: int | None = Field(None, ge=1)
    """The first N problems of each benchmark; None: all."""
    temperature: float = Field(0.6, ge=0)
    """Sampling temperature (R1's 0.6)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus mass (R1's 0.95)."""
    max_tokens: int = Field(1024, ge=1)
    """Longest sample, in tokens."""
    window: int = Field(16, ge=1)
    """The eval job's tasks in flight at most (training's window is its own)."""
    wait_s: float = Field(600.0, ge=0)
    """At the end of training, how long unfinished eval jobs may still run."""

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from pipeline.benchmarks import BENCHMARKS

        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown {unknown}; known: {', '.join(BENCHMARKS)}")
        return names


class LearnerConfig(BaseModel):
    """Everything the learner process needs; `load_config(LearnerConfig, path, section="learner")`."""

    model_config = CONFIG

    model: ModelConfig
    """The policy (and the reference model's initial weights)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    """Loss settings."""
    batch: int = Field(32, ge=1)
    """Scored groups per optimizer update."""
    max_staleness: int = Field(2, ge=0)
    """η: drop groups sampled more than this many policy versions ago."""
    publish_every: int = Field(1, ge=1)
    """Publish the weights every this many updates."""
    shard_mb: float = Field(256.0, gt=0)
    """Largest weight shard, in MiB of tensor data (one tensor larger than this gets a shard of its own).
    One shard's sha256 runs on one core (~1 GB/s) and an actor verifies `parallel` shards at
    once: a 1 GB version in 4 shards can use 4 cores, in one shard only one."""
    keep_versions: int = Field(2, ge=1)
    """Published weight versions kept in the object store (and the shared volume); older ones are deleted."""
    serving_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the published weights."""
    checkpoint_dir: str = "checkpoints"
    """Directory for DeepSpeed checkpoints."""
    weights_dir: str | None = None
    """Shared volume that actors can read: shards are written under `v{version}/` there and the manifest carries their paths."""
    weight_server: WeightServerConfig = Field(default_factory=WeightServerConfig)
    """Serving each published version over HTTP to the actors (`protocol.weight_server`)."""
    seed: int = 0
    """Seed for model initialisation (from `model.qwen2`) and the training RNGs."""
    dataset: DatasetConfig | None = None
    """Where prompts come from (needed by `aha learner`; `aha sft` and `aha export` ignore it)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many GRPO steps (checkpoint, publish, export, exit 0); None runs until stopped."""
    checkpoint_every: int = Field(1, ge=1)
    """Checkpoint every this many steps; scored groups are acknowledged only once checkpointed."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop (exit 1) after this many updates in a row whose loss or gradient was not finite
    (each is skipped: nothing applied, the groups to blame dead-lettered); the last good
    checkpoint stays."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (zero advantage, as DAPO's dynamic sampling) instead of training on them."""
    metrics_file: str | None = None
    """Append one JSON line per step (and a final `done` line) to this file (`aha up` reads it)."""
    final_model_dir: str | None = None
    """At `max_steps`, write the policy here as an HF folder (weights + config + tokenizer)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve the `aha_learner_*` Prometheus gauges on this port."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """TensorBoard / W&B logging of the step metrics and sample completions."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation during training: an eval job through the actors every N steps."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """NATS connection and stream settings (the file's `[bus]` section)."""
    ranks: int | None = Field(None, ge=1)
    """Training processes this node starts (`aha learner` launches them with PyTorch's
    elastic launcher), one per GPU; None: one per visible GPU, 1 without a GPU."""
    nodes: int = Field(1, ge=1)
    """Learner nodes (pods) training together, each starting `ranks` ranks; global rank 0
    does all the bus work."""
    node_rank: int | None = Field(None, ge=0)
    """This node's index, 0 to `nodes` − 1; None: the number after the last `-` of the host
    name (a StatefulSet pod's ordinal). Node 0 hosts the rendezvous."""
    rendezvous: str | None = None
    """`host:port` where node 0 listens and the other nodes meet it (needed with `nodes` > 1;
    one node uses a free local port)."""
    rendezvous_timeout_s: float = Field(900.0, gt=0)
    """How long a node waits at the rendezvous for all `nodes` to arrive."""
    stop_timeout_s: float = Field(300.0, ge=0)
    """With several ranks: on SIGTERM, how long they get to checkpoint and exit before the
    launcher kills them (keep it under the orchestrator's kill timeout)."""

    @model_validator(mode="after")
    def _scored_leases_fit(self):
        # Scored groups stay leased (unacked) until their checkpoint: the consumer must allow it.
        held = self.batch * self.checkpoint_every
        if held > self.bus.scored.max_ack_pending:
            raise ValueError(
                f"batch × checkpoint_every = {held} scored groups are held until a checkpoint, "
                f"more than bus.scored.max_ack_pending = {self.bus.scored.max_ack_pending}"
            )
        return self

    @model_validator(mode="after")
    def _cosine_has_a_length(self):
        if self.optim.schedule == "cosine" and self.schedule_steps is None:
            raise ValueError(
                "optim.total_steps: schedule 'cosine' needs optim.total_steps or max_steps"
            )
        return self

    @property
    def schedule_steps(self) -> int | None:
        """The LR schedule's length in optimizer steps: `optim.total_steps`, else the run's
        (`max_steps` updates of `ppo_epochs × minibatches` steps each); None if neither."""
        if self.optim.total_steps is not None:
            return self.optim.total_steps
        if self.max_steps is None:
            return None
        return self.max_steps * self.grpo.ppo_epochs * self.grpo.minibatches

    @model_validator(mode="after")
    def _nodes_meet(self):
        if self.nodes > 1 and self.rendezvous is None:
            raise ValueError("nodes > 1 needs rendezvous (host:port of node 0)")
        if self.node_rank is not None and self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nodes = {self.nodes}")
        if self.rendezvous is not None:
            host, _, port = self.rendezvous.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rendezvous {self.rendezvous!r} is not host:port")
        return self

    @property
    def in_flight_limit(self) -> int:
        """Most groups issued and not yet consumed: `(max_staleness + 1) × batch`."""
        return (self.max_staleness + 1) * self.batch
