"""A benchmark's figures: each measured value next to its same-run baseline, over several runs.

Every benchmark prints its figures as text, or with `--json` one line per figure:
`{"figure", "value", "unit", "baseline", "ratio", "runs", "min", "max", "baseline_runs", ...}`
(value and baseline are medians of the runs; the ratio is the median of the per-run ratios
when each run has its own baseline, else value / baseline, inverted for lower-is-better
units so that > 1 always means "better than the baseline"). The same lines go to
`benchmarks/results/<benchmark>-<date>.jsonl`, or to `--out FILE`.

Scripts in this folder put the repository first on sys.path (`benchmarks/learner.py` would
otherwise shadow the `learner` package) and import this module as `benchmarks.figures`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
"""Where each benchmark's figures are kept, one JSON line per figure."""


def figure(
    name: str,
    unit: str,
    runs: Sequence[float],
    baseline: Sequence[float] | None = None,
    *,
    higher: bool = True,
    paired: bool = False,
    **extra,
) -> dict:
    """One figure. `higher`: whether a larger value is better (GB/s) or worse (s/GB).
    `paired`: `baseline[i]` was measured beside `runs[i]`, so the ratio is the median of the
    per-run ratios (steadier on a shared machine than a ratio of medians)."""
    runs = [float(r) for r in runs]
    value = statistics.median(runs)
    base = statistics.median(baseline) if baseline else None
    ratio = None
    if paired and baseline:
        pairs = zip(runs, baseline, strict=True)
        ratio = statistics.median(r / b if higher else b / r for r, b in pairs)
    elif base:
        ratio = value / base if higher else base / value
    return {
        "figure": name,
        "value": value,
        "unit": unit,
        "baseline": base,
        "ratio": ratio,
        "runs": runs,
        "min": min(runs),
        "max": max(runs),
        "baseline_runs": [float(b) for b in baseline] if baseline else None,
        **extra,
    }


def spread(values: Sequence[float]) -> str:
    """`min/median/max` with three significant digits."""
    return f"{min(values):.3g}/{statistics.median(values):.3g}/{max(values):.3g}"


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON line per figure on stdout")
    parser.add_argument(
        "--out", help="results file (default: benchmarks/results/<benchmark>-<date>.jsonl)"
    )


def describe(f: dict) -> str:
    """One text line: the figure's min/median/max, its baseline's, and the ratio."""
    line = f"{f['figure']:32s} {spread(f['runs'])} {f['unit']}"
    if f.get("baseline_runs"):
        line += f"   baseline {spread(f['baseline_runs'])}"
    if f.get("ratio") is not None:
        line += f"   ratio {f['ratio']:.3g}"
    return line


def report(figures: Sequence[dict], args: argparse.Namespace, benchmark: str) -> Path:
    """Print `figures` (JSON lines with `--json`, else a min/median/max table) and write them
    to the results file; returns its path."""
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0]}
    lines = [json.dumps({**f, **stamp}) for f in figures]
    if args.json:
        print("\n".join(lines), flush=True)
    else:
        print(f"{benchmark}: min/median/max over the runs; ratio > 1 is better than the baseline")
        print("\n".join("  " + describe(f) for f in figures), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{benchmark}-{time.strftime('%Y%m%d')}.jsonl"
    if not args.out and out.exists():  # an earlier run of the day is kept: results are records
        out = out.with_name(f"{benchmark}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
