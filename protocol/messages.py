"""The messages of the loop (DESIGN.md, "Messages").

learner --Task--> actors --Rollout--> rewarders --ScoredRollout--> learner, and the
learner's WeightManifest back to the actors through the KV bucket. Each class says who
produces and who consumes it. Token ids and log-probs are numpy arrays in memory
(`int32`, `float32`) and packed little-endian bytes on the wire (see `codec.py`).

`schema` is bumped on a breaking change; a consumer refuses a version it does not know
rather than misreading it.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from protocol.names import JOB_TRAIN, check_job

SCHEMA = 1
"""Current wire schema of every message below."""


def _as_array(dtype: str):
    target = np.dtype(dtype)
    wire = target.newbyteorder("<")
    size, native = wire.itemsize, wire == target

    def coerce(value: Any) -> np.ndarray:
        if type(value) is bytes:  # the wire form (see codec.py): little-endian, no copy
            if len(value) % size:
                raise ValueError(f"{len(value)} bytes are not a whole number of {dtype}")
            array = np.frombuffer(value, dtype=wire)
            return array if native else array.astype(target)
        if isinstance(value, np.ndarray) and value.dtype == target and value.ndim == 1:
            return value  # already what the field holds: no copy, no checks to repeat
        if value is None:
            raise ValueError("expected an array, got null")
        if isinstance(value, (bytearray, memoryview)):
            value = np.frombuffer(value, dtype=wire)
        array = np.asarray(value)
        if array.ndim != 1:
            raise ValueError(f"expected a 1-D array, got shape {array.shape}")
        if array.size and dtype == "int32" and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {array.dtype}")
        return array.astype(dtype, copy=False)

    return coerce


_max = np.maximum.reduce
"""`ndarray.max` without its Python wrapper (a few µs per sample on small arrays)."""


def _json_list(dtype: str) -> dict:
    return {"type": "array", "items": {"type": "integer" if dtype == "int32" else "number"}}


TokenIds = Annotated[
    np.ndarray,
    BeforeValidator(_as_array("int32")),
    PlainSerializer(lambda a: a, when_used="python"),
    PlainSerializer(lambda a: a.tolist(), when_used="json"),
    WithJsonSchema(_json_list("int32")),
]
"""1-D `int32` token ids; accepts lists, arrays or little-endian bytes."""

LogProbs = Annotated[
    np.ndarray,
    BeforeValidator(_as_array("float32")),
    PlainSerializer(lambda a: a, when_used="python"),
    PlainSerializer(lambda a: a.tolist(), when_used="json"),
    WithJsonSchema(_json_list("float32")),
]
"""1-D `float32` log-probabilities, one per sampled token."""


class _Message(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True
    )

    schema_: int = Field(SCHEMA, alias="schema")
    """Wire schema version; a consumer rejects versions it does not know."""

    @model_validator(mode="after")
    def _known_schema(self):
        if self.schema_ != SCHEMA:
            raise ValueError(f"schema {self.schema_} is not supported (this build reads {SCHEMA})")
        return self


class Sampling(BaseModel):
    """How an actor samples a task's completions (mirrors vLLM's SamplingParams)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; the log-probs sent back are those of this tempered distribution."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass. Anything below 1 makes μ differ from the learner's π: keep 1 for RL."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 disables it."""
    max_tokens: int = Field(256, ge=1)
    """Longest completion, in tokens."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a completion (kept out of the returned text)."""
    seed: int | None = None
    """Per-task sampling seed, for reproducible rollouts."""


class Task(_Message):
    """One prompt to sample a group of completions for.

    Producer: the learner's dispatcher. Consumer: actors (via `aha.tasks`). Rewarders and the
    learner see it again inside the `Rollout`.
    """

    task_id: str = Field(min_length=1)
    """Unique per issue of a prompt; also the deduplication id of every message it causes."""
    prompt_id: str
    """Stable id of the dataset row, shared by every task issued for it."""
    prompt: str
    """Rendered prompt text (chat template or R1-Zero template applied)."""
    prompt_token_ids: TokenIds | None = None
    """The prompt already tokenized by the learner; actors use it instead of the text when set."""
    reference: Any = None
    """What the rewards compare with: an answer string, or an object (code tests)."""
    rewards: dict[str, FiniteFloat] = Field(min_length=1)
    """Reward function name -> weight; the total reward is the weighted sum."""
    group_size: int = Field(ge=1)
    """G: completions to sample for this prompt."""
    sampling: Sampling = Field(default_factory=Sampling)
    """Sampling parameters for all G completions."""
    issued_version: int = Field(ge=0)
    """Policy version of the learner when it issued the task."""
    issued_at: float = Field(default_factory=time.time)
    """Unix time the task was published (queue wait = pickup time - this)."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Free-form task context for rewards, e.g. `{"language": "en"}`."""
    job: str = JOB_TRAIN
    """The job it belongs to: its scored group goes to `aha.scored.<job>`, read by that job's
    consumer only (`train`: the learner's). Letters, digits, `-`, `_`."""
    model: str | None = Field(None, min_length=1, max_length=4096)
    """A model folder (on the actors' machines) to sample with instead of the learner's
    latest weights; an actor refuses one outside its `actor.model_dirs`."""
    policy: str | None = Field(None, min_length=1, max_length=64)
    """The learner policy to sample with (its `WeightManifest.policy`): an actor serving
    another one (an earlier pipeline stage's learner) switches to it first, and refuses the
    task once another policy is published (its learner is gone). None: whatever is served."""

    @field_validator("job")
    @classmethod
    def _safe_job(cls, job: str) -> str:
        return check_job(job)

    @property
    def msg_id(self) -> str:
        return self.task_id


FinishReason = Literal["stop", "length", "abort"]


class Sample(BaseModel):
    """One sampled completion of a rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    token_ids: TokenIds
    """Completion token ids (prompt excluded)."""
    logprobs: LogProbs
    """Behaviour log-prob log μ(token) of each sampled token, temperature applied."""
    text: str
    """Detokenized completion."""
    finish_reason: FinishReason
    """`stop`: EOS or a stop string; `length`: hit max_tokens; `abort`: cut short."""

    @model_validator(mode="after")
    def _aligned(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} log-probs")
        # NaN or +inf would poison the importance weight of every update it enters; -inf (a
        # token the engine gave no mass) is only truncated by `is_cap`.
        # One reduction on the common (clean) path: max is NaN if any is, +inf if any is.
        if len(self.logprobs) and not _max(self.logprobs) < np.inf:
            bad = np.isnan(self.logprobs) | (self.logprobs == np.inf)
            raise ValueError(f"log-prob {self.logprobs[bad][0]} at token {int(np.argmax(bad))}")
        return self


class Timings(BaseModel):
    """Where a rollout's time went, for the queue-wait and throughput metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queued_seconds: float = 0.0
    """From the task's `issued_at` until an actor picked it up."""
    generation_seconds: float = 0.0
    """Time the engine spent on this group."""
    finished_at: float = Field(default_factory=time.time)
    """Unix time the rollout was published."""


class Rollout(_Message):
    """G completions of one task, tagged with the policy version that sampled them.

    Producer: an actor. Consumer: rewarders (via `aha.rollouts`); the learner reads it again
    inside the `ScoredRollout`.
    """

    task: Task
    """The task this answers (rewarders need its reference and rewards)."""
    policy_version: int = Field(ge=0)
    """Version of the weights that produced every sample (the behaviour policy μ)."""
    actor_id: str
    """Which actor produced it."""
    prompt_token_ids: TokenIds
    """The prompt tokens the engine conditioned on."""
    samples: list[Sample]
    """One entry per completion, `task.group_size` of them."""
    timings: Timings = Field(default_factory=Timings)
    """Queue wait and generation time."""

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def msg_id(self) -> str:
        return f"{self.task.task_id}.rollout"

    @model_validator(mode="after")
    def _one_per_completion(self):
        if len(self.samples) != self.task.group_size:
            raise ValueError(
                f"{len(self.samples)} samples for a task of group_size {self.task.group_size}"
            )
        return self


class Score(BaseModel):
    """The reward of one completion, or why there is none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: FiniteFloat | None
    """Weighted sum of the components; None when a verifier could not decide. Never NaN or
    infinite: one such reward would turn every weight of the policy into NaN."""
    components: dict[str, FiniteFloat | None] = Field(default_factory=dict)
    """Each named reward's value before weighting (None where that verifier failed)."""
    error: str | None = None
    """Why `reward` is None (verifier error or timeout); None otherwise."""
    note: str | None = None
    """Why a component is 0 by a rule, for what the completion did (`name: reason`, e.g. an
    answer that stalled its verifier or hedged, code that hung); None otherwise."""
    answer: str | None = Field(None, max_length=1000)
    """The completion's final answer as the task's accuracy reward reads it (whitespace runs
    made one space; GSM8K's number as its value), the text majority votes compare; None when
    it gives none or its rewards have no answer (code)."""

    @model_validator(mode="after")
    def _reward_or_reason(self):
        if (self.reward is None) != (self.error is not None):
            raise ValueError("a score has either a reward or an error, not both or neither")
        return self

    @classmethod
    def of(
        cls,
        reward: float | None,
        components: dict[str, float | None],
        error: str | None,
        note: str | None = None,
        answer: str | None = None,
    ) -> Score:
        """The score of a verifier's `(reward, components, error, note)`, where a non-finite
        value becomes None with its reason (a verifier that returns NaN could not decide)."""
        bad = {n: v for n, v in components.items() if v is not None and not math.isfinite(v)}
        if reward is not None and not math.isfinite(reward):
            bad["reward"] = reward
        if not bad:
            return cls(reward=reward, components=components, error=error, note=note, answer=answer)
        reason = "non-finite " + ", ".join(f"{n} {v}" for n, v in bad.items())
        return cls(
            reward=None,
            components={n: None if n in bad else v for n, v in components.items()},
            error=f"{error}; {reason}" if error else reason,
            note=note,
            answer=answer,
        )


class ScoredRollout(_Message):
    """A rollout with one score per completion.

    Producer: a rewarder. Consumer: the learner (via `aha.scored`).
    """

    rollout: Rollout
    """The rollout as the actor sent it."""
    scores: list[Score]
    """One per sample, in the same order."""
    rewarder_id: str = ""
    """Which rewarder scored it."""
    scoring_seconds: float = 0.0
    """Wall time spent scoring the group."""

    @property
    def task_id(self) -> str:
        return self.rollout.task.task_id

    @property
    def msg_id(self) -> str:
        return f"{self.rollout.task.task_id}.scored"

    @property
    def job(self) -> str:
        return self.rollout.task.job

    @model_validator(mode="after")
    def _one_per_sample(self):
        if len(self.scores) != len(self.rollout.samples):
            raise ValueError(f"{len(self.scores)} scores for {len(self.rollout.samples)} samples")
        return self


COMPLETION_TOKEN_BYTES = 16
"""Upper estimate of one completion token in a `ScoredRollout`: its id (4 bytes), its log-prob
(4) and its share of the text (UTF-8, a few characters per token in every tokenizer we use)."""
SAMPLE_BYTES = 512
"""Upper estimate of one sample's and one score's fields besides the tokens and the text."""
MESSAGE_BYTES = 4096
"""Upper estimate of a scored group's fields besides the task and the samples (headers too)."""


def estimate_scored_bytes(
    group_size: int, max_tokens: int, task_bytes: int, prompt_tokens: int
) -> int:
    """Upper estimate of the encoded `ScoredRollout` of a task (the largest message of its
    journey): the task (`task_bytes` encoded), the prompt tokens again in the rollout, and G
    completions of up to `max_tokens` tokens each.

    16 completions × 8k tokens come to about 2 MiB, × 32k to about 8 MiB: more than NATS's
    default `max_payload` of 1 MiB.
    """
    completion = max_tokens * COMPLETION_TOKEN_BYTES + SAMPLE_BYTES
    return task_bytes + 4 * prompt_tokens + group_size * completion + MESSAGE_BYTES


NATS_MAX_PAYLOAD = 64 << 20
"""nats-server refuses a larger `max_payload`."""


def payload_limit(group_size: int, max_tokens: int, prompt_bytes: int = 64 * 1024) -> int:
    """The `max_payload` a NATS server needs for groups of `group_size` × `max_tokens` with
    prompts of up to `prompt_bytes` (text and tokens): the estimate plus a quarter, rounded up
    to a MiB, never below the 8 MiB aha's deployments set nor above what NATS allows (the
    learner then says at start which settings are too large)."""
    needed = estimate_scored_bytes(group_size, max_tokens, 2 * prompt_bytes, prompt_bytes // 4)
    mib = 1 << 20
    return min(NATS_MAX_PAYLOAD, max(8 * mib, -(-needed * 5 // 4 // mib) * mib))


class Shard(BaseModel):
    """One safetensors file of a weight version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """File name, e.g. `model-00001-of-00002.safetensors`; the object is `v{version}/{name}`."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex digest of the file's bytes; actors reject a shard that does not match."""
    bytes: int = Field(ge=0)
    """File size."""
    tensors: list[str]
    """Parameter names stored in this shard."""
    path: str | None = None
    """Absolute path on a shared volume, when learner and actors share one."""


class WeightManifest(_Message):
    """A complete, published weight version.

    Producer: the learner, written to KV `aha-policy` key `latest` once actors can fetch
    every shard: after every shard is in the object store, or, when a `sources` server
    serves them, at once, with their store copy uploaded after it (`stored` false).
    Consumer: actors, which load it between generation batches.
    """

    version: int = Field(ge=0)
    """Policy version; rollouts sampled with these weights carry it."""
    step: int = Field(ge=0)
    """Learner optimizer step that produced it."""
    shards: list[Shard] = Field(min_length=1)
    """All shards of the state dict."""
    dtype: str
    """Serving dtype of every tensor (`float32`, `bfloat16`, `float16`)."""
    index_name: str = "model.safetensors.index.json"
    """HF-style index object stored next to the shards."""
    created_at: float = Field(default_factory=time.time)
    """Unix time the manifest was written."""
    sources: list[Annotated[str, Field(pattern=r"^http://[^/\s]+/[0-9a-f]{16,64}$")]] = Field(
        default_factory=list, max_length=8
    )
    """HTTP servers of this version's shards (`http://host:port/<token>`, the file is
    `<source>/v<version>/<name>`), tried before the object store (`protocol.weight_server`)."""
    stored: bool = True
    """Whether every object was in the store when this manifest was written. False: the store
    copy is being uploaded after it, and an actor that needs it (HTTP failed) waits for it."""
    policy: str = Field("", max_length=64)
    """Which learner's policy this is (its run key): versions count from 0 per policy, so an
    actor compares versions only within one (`Task.policy`)."""
    model: str | None = Field(None, max_length=4096)
    """The folder the policy started from (its architecture and tokenizer), for an actor whose
    engine runs another architecture; it must be under the actor's `actor.model_dirs`."""

    @property
    def prefix(self) -> str:
        return f"v{self.version}/"

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


MESSAGES: dict[str, type[_Message]] = {
    cls.__name__: cls for cls in (Task, Rollout, ScoredRollout, WeightManifest)
}
"""Top-level message classes by name (the `Stage.message` field)."""
