"""benchmarks/bus.py at its smallest, so its figures cannot rot: the two figure lines the README
quotes, each round's ratio against the raw round beside it, nothing lost on either side."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bus_benchmark_prints_both_figures_against_raw_nats(tmp_path):
    out = tmp_path / "bus.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bus.py"),
            "--messages",
            "12",
            "--small-messages",
        ]
        + ["12", "--rounds", "3", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # The script asserts that each side consumed every message it published.
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines == out.read_text().splitlines()
    figures = {f["figure"]: f for f in map(json.loads, lines)}
    assert list(figures) == ["bus_rollout", "bus_small"]
    sizes = {"bus_rollout": (8, 1024, 4 * 8 * 2 * 1024), "bus_small": (2, 16, 4 * 2 * 2 * 16)}
    for name, (group, tokens, array_bytes) in sizes.items():
        f = figures[name]
        assert (f["group"], f["tokens"], f["unit"]) == (group, tokens, "messages/s")
        # int32 ids and float32 log-probs of every token, plus text and framing
        assert array_bytes < f["message_bytes"] < 3 * array_bytes + 2000
        assert len(f["runs"]) == len(f["baseline_runs"]) == 3
        ratios = [a / r for a, r in zip(f["runs"], f["baseline_runs"], strict=True)]
        assert f["ratio"] == statistics.median(ratios)
        assert f["min"] <= f["value"] <= f["max"] and f["value"] == statistics.median(f["runs"])
        codec = f["codec_cpu_us_per_message"]
        assert set(codec) == {"encode", "unpack", "validate", "decode"}
        assert all(v > 0 for v in codec.values())
