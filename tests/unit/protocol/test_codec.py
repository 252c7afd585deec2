"""Codec round trips (hypothesis) and the one typed error for bytes that are not a message."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import DecodeError, EncodeError, decode, encode
from protocol.messages import (
    Rollout,
    Sample,
    Sampling,
    Score,
    ScoredRollout,
    Shard,
    Task,
    WeightManifest,
)
from tests.helpers import make_rollout, make_task

token_ids = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=64)
finite = st.floats(-1e6, 0.0, width=32, allow_nan=False)


@st.composite
def samples(draw) -> Sample:
    ids = draw(token_ids)
    logps = draw(st.lists(finite, min_size=len(ids), max_size=len(ids)))
    return Sample(
        token_ids=ids,
        logprobs=logps,
        text=draw(st.text()),  # any unicode, including surrogate-free astral characters
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
    )


@st.composite
def rollouts(draw) -> Rollout:
    group = draw(st.lists(samples(), min_size=1, max_size=4))
    task = Task(
        task_id=draw(st.text(min_size=1, max_size=20)),
        prompt_id=draw(st.text(max_size=20)),
        prompt=draw(st.text()),
        prompt_token_ids=draw(st.none() | token_ids),
        reference=draw(
            st.none()
            | st.text()
            | st.dictionaries(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3))
        ),
        rewards=draw(
            st.dictionaries(st.text(min_size=1, max_size=12), st.floats(0, 10), min_size=1)
        ),
        group_size=len(group),
        sampling=Sampling(temperature=draw(st.floats(0, 2)), max_tokens=draw(st.integers(1, 4096))),
        issued_version=draw(st.integers(0, 10**6)),
        meta=draw(
            st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.text())
        ),
    )
    return Rollout(
        task=task,
        policy_version=draw(st.integers(0, 10**6)),
        actor_id=draw(st.text(max_size=16)),
        prompt_token_ids=draw(token_ids),
        samples=group,
    )


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    without_ids = {"prompt_token_ids"}
    assert a.task.model_dump(exclude=without_ids) == b.task.model_dump(exclude=without_ids)
    if a.task.prompt_token_ids is None:
        assert b.task.prompt_token_ids is None
    else:
        np.testing.assert_array_equal(a.task.prompt_token_ids, b.task.prompt_token_ids)
    assert (a.policy_version, a.actor_id, a.timings) == (b.policy_version, b.actor_id, b.timings)
    np.testing.assert_array_equal(a.prompt_token_ids, b.prompt_token_ids)
    for x, y in zip(a.samples, b.samples, strict=True):
        assert (x.text, x.finish_reason) == (y.text, y.finish_reason)
        assert y.token_ids.dtype == np.int32 and y.logprobs.dtype == np.float32
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)


@settings(max_examples=150, deadline=None)
@given(rollouts())
def test_any_rollout_survives_a_round_trip(rollout):
    assert_same_rollout(rollout, decode(encode(rollout), Rollout))


@settings(max_examples=50, deadline=None)
@given(rollouts(), st.lists(st.none() | st.floats(-5, 5), min_size=4, max_size=4))
def test_scored_rollouts_keep_none_rewards(rollout, rewards):
    scores = [
        Score(reward=r, components={"acc": r}, error=None if r is not None else "timeout")
        for r in rewards[: len(rollout.samples)]
    ]
    scored = ScoredRollout(rollout=rollout, scores=scores)
    back = decode(encode(scored), ScoredRollout)
    assert back.scores == scored.scores
    assert_same_rollout(scored.rollout, back.rollout)


def test_empty_completion_and_32k_tokens():
    task = make_task(group_size=2)
    rng = np.random.default_rng(0)
    long_ids = rng.integers(0, 151_936, size=32_768).astype(np.int32)
    long_logps = -rng.exponential(size=32_768).astype(np.float32)
    rollout = Rollout(
        task=task,
        policy_version=3,
        actor_id="a",
        prompt_token_ids=[],
        samples=[
            Sample(token_ids=[], logprobs=[], text="", finish_reason="abort"),
            Sample(token_ids=long_ids, logprobs=long_logps, text="é" * 100, finish_reason="length"),
        ],
    )
    data = encode(rollout)
    # Packed arrays: 32k tokens x (4 B id + 4 B log-prob) plus a little framing, not 32k floats
    # as msgpack numbers (which would be 5 + 9 bytes each).
    assert 2 * 4 * 32_768 < len(data) < 2 * 4 * 32_768 + 2_000
    back = decode(data, Rollout)
    assert back.samples[0].token_ids.shape == (0,) and back.samples[0].text == ""
    np.testing.assert_array_equal(back.samples[1].token_ids, long_ids)
    np.testing.assert_array_equal(back.samples[1].logprobs, long_logps)


def test_token_ids_and_log_probs_travel_as_little_endian_bytes():
    sample = Sample(
        token_ids=[1, 256, -1], logprobs=[-0.5, 0.0, -2.0], text="", finish_reason="stop"
    )
    rollout = Rollout(
        task=make_task(group_size=1),
        policy_version=0,
        actor_id="a",
        prompt_token_ids=[7],
        samples=[sample],
    )
    wire = msgpack.unpackb(encode(rollout), raw=False)
    # int32 1, 256, -1 and float32 -0.5 (0xBF000000), 0.0, -2.0 (0xC0000000), low byte first
    assert wire["samples"][0]["token_ids"] == b"\x01\0\0\0\0\x01\0\0\xff\xff\xff\xff"
    assert wire["samples"][0]["logprobs"] == b"\0\0\0\xbf\0\0\0\0\0\0\0\xc0"
    assert wire["prompt_token_ids"] == b"\x07\0\0\0"
    back = decode(encode(rollout), Rollout).samples[0]
    assert back.token_ids.tolist() == [1, 256, -1] and back.logprobs.tolist() == [-0.5, 0.0, -2.0]


def test_a_strided_array_is_sent_as_its_elements():
    ids = np.arange(8, dtype=np.int32)[::2]  # a view with a stride of 8 bytes
    sample = Sample(
        token_ids=ids, logprobs=np.zeros(8, np.float32)[::2], text="", finish_reason="stop"
    )
    rollout = Rollout(
        task=make_task(group_size=1),
        policy_version=0,
        actor_id="a",
        prompt_token_ids=[],
        samples=[sample],
    )
    assert decode(encode(rollout), Rollout).samples[0].token_ids.tolist() == [0, 2, 4, 6]


def test_arrays_in_the_extension_form_still_decode():
    """Arrays as extension type 1 (`{dtype, shape, bytes}`, what writers before the bin form
    sent, and what any other array becomes) decode to the same message."""
    rollout = make_rollout(make_task(group_size=2))
    wire = msgpack.unpackb(encode(rollout), raw=False)

    def ext(data: bytes, code: int) -> msgpack.ExtType:
        return msgpack.ExtType(1, bytes([code, 1]) + (len(data) // 4).to_bytes(4, "little") + data)

    wire["prompt_token_ids"] = ext(wire["prompt_token_ids"], 1)  # dtype code 1: int32
    for s in wire["samples"]:
        s["token_ids"], s["logprobs"] = ext(s["token_ids"], 1), ext(s["logprobs"], 2)  # 2: f32
    assert_same_rollout(rollout, decode(msgpack.packb(wire, use_bin_type=True), Rollout))
    grid = np.arange(6, dtype=np.int64).reshape(2, 3)
    back = decode(encode(make_task(meta={"grid": grid})), Task).meta["grid"]
    assert back.dtype == np.int64 and back.tolist() == [[0, 1, 2], [3, 4, 5]]
    # big-endian and strided arrays are sent little-endian, in order
    swapped = decode(encode(make_task(meta={"g": grid.astype(">i8").T})), Task).meta["g"]
    assert swapped.dtype == np.int64 and swapped.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_token_bytes_that_are_not_whole_int32s_name_the_field():
    wire = msgpack.unpackb(encode(make_rollout(make_task(group_size=2))), raw=False)
    wire["samples"][1]["token_ids"] = bytes(6)
    with pytest.raises(DecodeError) as e:
        decode(msgpack.packb(wire, use_bin_type=True), Rollout)
    assert "samples.1.token_ids: Value error, 6 bytes are not a whole number of int32" in str(
        e.value
    )


def test_weight_manifest_round_trip():
    manifest = WeightManifest(
        version=12,
        step=40,
        dtype="bfloat16",
        shards=[
            Shard(
                name="model-00001-of-00001.safetensors",
                sha256="ab" * 32,
                bytes=123,
                tensors=["lm_head.weight"],
                path="/shared/v12/model-00001-of-00001.safetensors",
            )
        ],
    )
    assert decode(encode(manifest), WeightManifest) == manifest
    assert manifest.prefix == "v12/" and manifest.total_bytes == 123


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not msgpack"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2, 3]), "expected a msgpack map, got list"),
        (msgpack.packb({"schema": 99}), "schema 99 is not supported"),
        (msgpack.packb({"schema": 1, "task_id": "x"}), "prompt_id: Field required"),
        (
            msgpack.packb(
                {
                    "task_id": "t",
                    "prompt_id": "p",
                    "prompt": "",
                    "rewards": {"a": 1.0},
                    "group_size": 0,
                    "issued_version": 0,
                }
            ),
            "group_size: Input should be greater than or equal to 1",
        ),
        (
            msgpack.packb({"task_id": "t", "surprise": 1}),
            "surprise: Extra inputs are not permitted",
        ),
        (msgpack.packb({"task_id": msgpack.ExtType(9, b"")}), "not msgpack"),
        # an array whose header promises 3 int32 but carries 2
        (
            msgpack.packb({"x": msgpack.ExtType(1, bytes([1, 1, 3, 0, 0, 0]) + bytes(8))}),
            "header says 3 elements, the data holds 2",
        ),
    ],
)
def test_bytes_that_are_not_a_task_raise_one_typed_error(data, reason):
    with pytest.raises(DecodeError, match="not a valid Task") as e:
        decode(data, Task)
    assert reason in str(e.value)
    assert e.value.expected == "Task"


def test_misaligned_samples_and_scores_are_rejected():
    with pytest.raises(ValueError, match="3 token ids but 2 log-probs"):
        Sample(token_ids=[1, 2, 3], logprobs=[0.0, 0.0], text="", finish_reason="stop")
    rollout = make_rollout(make_task(group_size=2))
    with pytest.raises(ValueError, match="1 scores for 2 samples"):
        ScoredRollout(rollout=rollout, scores=[Score(reward=1.0)])
    with pytest.raises(ValueError, match="either a reward or an error"):
        Score(reward=None)  # a missing reward must say why: never a silent 0
    with pytest.raises(ValueError, match="token ids must be integers"):
        Sample(token_ids=[0.5], logprobs=[0.0], text="", finish_reason="stop")


def test_what_msgpack_cannot_carry_fails_at_encode_with_a_clear_error():
    with pytest.raises(EncodeError, match="cannot encode Task: .*int"):
        encode(make_task(meta={"n": 2**64}))  # msgpack integers stop at 64 bits
    with pytest.raises(EncodeError, match="cannot encode Task: .*complex64"):
        encode(make_task(meta={"z": np.zeros(2, np.complex64)}))
    # The failed message left nothing behind in the packer the next one reuses.
    task = make_task(7)
    assert decode(encode(task), Task) == task


def forged_scored(reward: float) -> bytes:
    """A scored group whose first reward is `reward`, encoded without validation (as a forger
    or a buggy rewarder would send it)."""
    rollout = make_rollout(make_task(group_size=2))
    scores = [
        Score.model_construct(reward=reward, components={"accuracy_math": reward}, error=None),
        Score(reward=0.0, components={"accuracy_math": 0.0}),
    ]
    return encode(
        ScoredRollout.model_construct(
            rollout=rollout, scores=scores, rewarder_id="x", scoring_seconds=0.0, schema_=1
        )
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_reward_is_not_a_message(value):
    with pytest.raises(ValueError, match="finite number"):
        Score(reward=value, components={"accuracy_math": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        Score(reward=1.0, components={"accuracy_math": value})
    with pytest.raises(
        DecodeError, match=r"not a valid ScoredRollout: scores\.0\.reward: .*finite"
    ):
        decode(forged_scored(value), ScoredRollout)
    assert (
        decode(forged_scored(1.0), ScoredRollout).scores[0].reward == 1.0
    )  # the forgery itself is sound
    with pytest.raises(ValueError, match="finite number"):
        Task(
            task_id="t",
            prompt_id="p",
            prompt="",
            rewards={"accuracy_math": value},
            group_size=1,
            issued_version=0,
        )


def test_a_verifier_that_returns_nan_gives_no_reward_with_the_reason():
    # What the rewarder's pool builds from a verifier's (reward, components, error).
    score = Score.of(float("nan"), {"accuracy_math": float("nan"), "format_think": 1.0}, None)
    assert score.reward is None and score.components == {"accuracy_math": None, "format_think": 1.0}
    assert score.error == "non-finite accuracy_math nan, reward nan"
    assert Score.of(0.5, {"accuracy_math": 0.5}, None) == Score(
        reward=0.5, components={"accuracy_math": 0.5}
    )
    assert Score.of(None, {"a": None}, "a: timeout").error == "a: timeout"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_log_prob_is_not_a_sample(value):
    with pytest.raises(ValueError, match=f"log-prob {value} at token 1"):
        Sample(token_ids=[1, 2], logprobs=[-0.5, value], text="", finish_reason="stop")
    with pytest.raises(ValueError, match=f"log-prob {value} at token 2"):  # behind a -inf
        Sample(token_ids=[1, 2, 3], logprobs=[-np.inf, -1.0, value], text="", finish_reason="stop")
    Sample(token_ids=[1], logprobs=[-np.inf], text="", finish_reason="stop")  # truncated by is_cap
    Sample(token_ids=[], logprobs=[], text="", finish_reason="stop")
