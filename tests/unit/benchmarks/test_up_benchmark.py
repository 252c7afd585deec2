"""benchmarks/up.py's compute size (issue 12, item 3) and where it says each contender's time
goes: the model it cold-starts, the actor's generation / weight-load / idle time read from its
log lines, TRL's split, and flags refused before any work."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from benchmarks.up import (
    SIZES,
    actor_figures,
    busy_seconds,
    count_parameters,
    parse_args,
    size_spec,
    trl_time_split,
)
from pipeline.coldstart import cold_start_model


def test_the_compute_size_is_cold_started_at_its_hand_counted_size(tmp_path):
    model = cold_start_model(tmp_path, [], steps=0, seed=3, spec=size_spec("compute"))

    config = json.loads((model / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 4)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (4, 512)
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM's CPU attention
    assert json.loads((model / "tiny_spec.json").read_text())["seed"] == 3
    # vocab 28 (pad/bos/eos + 21 characters + 4 tags), h = 128, FFN 512, tied embeddings:
    #   embeddings 28·128 = 3,584; final norm 128
    #   per layer: q, k, v, o 4·128² = 65,536 + q/k/v biases 3·128 = 384
    #              + gate, up, down 3·128·512 = 196,608 + two norms 2·128 = 256 → 262,784
    #   3,584 + 4·262,784 + 128 = 1,054,848
    assert count_parameters(model) == 1_054_848


def test_the_demo_size_is_the_demos_model(tiny_model_dir):
    assert SIZES["demo"] == {} and size_spec("demo") == size_spec("demo").__class__()
    assert count_parameters(tiny_model_dir) == 162_560  # DEMO.md's count


def test_overlapping_generations_count_once_and_only_inside_the_window():
    # window [0.5, 5.5]: (0, 2) and (1, 3) overlap → [0.5, 3] = 2.5; (5, 6) → [5, 5.5] = 0.5;
    # (7, 8) lies outside.
    assert busy_seconds([(5, 6), (0, 2), (1, 3), (7, 8)], 0.5, 5.5) == pytest.approx(3.0)
    assert busy_seconds([], 0, 10) == 0.0


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def test_the_actors_time_is_split_into_generation_weight_loading_and_idle(tmp_path):
    t0 = 1_796_000_000.0  # the end of learner step 1; step 3 ends at t0 + 10 (2 steps)
    lines = [
        "Loading weights: 100%",  # vLLM's own output, not ours
        {"event": "actor ready", "backend": "vllm", "timestamp": stamp(t0 - 30)},
        {"event": "rollout", "seconds": 3.0, "timestamp": stamp(t0 + 1)},  # [−2, 1] → [0, 1]
        {"event": "rollout", "seconds": 2.0, "timestamp": stamp(t0 + 2)},  # [0, 2]
        {
            "event": "weights loaded",
            "fetch_seconds": 0.5,
            "load_seconds": 1.5,
            "timestamp": stamp(t0 + 4),
        },  # [2, 4]
        {"event": "rollout", "seconds": 3.0, "timestamp": stamp(t0 + 7)},  # [4, 7]
        {"event": "rollout", "seconds": 1.0, "timestamp": stamp(t0 + 12)},  # after the window
    ]
    log = tmp_path / "actor-0.log"
    log.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")

    figures = actor_figures(log, t0, t0 + 10, steps=2)

    # generating [0, 2] ∪ [4, 7] = 5 s over 2 steps; loading [2, 4] = 2 of 10 s; idle 10 − 7.
    assert figures == {"engine": "vllm", "gen_s": 2.5, "actor_load": 0.2, "actor_idle": 0.3}


def test_trls_time_is_split_over_the_same_window():
    # Steps end at 100, 110 and 125 s; seconds in _generate so far when each batch was scored:
    # 3 (step 1's own, outside the window), 6, 10. Window 25 s, 2 steps, generating 10 − 3 = 7:
    # 3.5 s of generation and (25 − 7) / 2 = 9 s of the rest per step; idle 18 of 25 s.
    steps = [{"time": 100.0, "sample_s": 3.0}, {"time": 110.0, "sample_s": 6.0}]
    res = {"steps": [*steps, {"time": 125.0, "sample_s": 10.0}], "threads": 2}
    split = trl_time_split(res)
    assert (split["gen_s"], split["update_s"], split["actor_idle"]) == (3.5, 9.0, 0.72)
    assert split["engine"] == "transformers generate, 2 threads"
    assert trl_time_split({"steps": steps[:1], "threads": 2}) == {}  # one step: no window


@pytest.mark.parametrize(
    "argv, field",
    [(["--trl-threads", "0"], "--trl-threads"), (["--size", "huge"], "--size")],
)
def test_bad_flags_are_refused_naming_the_flag(argv, field, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert field in capsys.readouterr().err


def test_trl_gets_the_two_cores_aha_gets_by_default():
    args = parse_args(["--size", "compute"])
    assert args.trl_threads == 2 and args.size == "compute"
