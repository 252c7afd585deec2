"""Rewarder throughput: math verifications/s and sandboxed code runs/s, 1 vs 2 workers.

    .venv/bin/python benchmarks/rewards.py [--math N] [--code N] [--workers 1 2] [--runs 3]
        [--json] [--out FILE]

Math: MATH-500 reference solutions scored by `accuracy_math` (Math-Verify). Code: HumanEval
canonical solutions run with their tests by `code_tests` in the sandbox. Each pool is warmed
up first; figures and ratios come from the same run. The load average is printed because a
shared machine's other work changes the figures, and so is the number of cores the math
workers actually got: a second worker helps only if there is a second idle core. Figures
(`benchmarks/figures.py`): `rewards_math_workers<n>` and `rewards_code_workers<n>` per worker
count over `--runs`, with the first worker count's runs as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import add_output_args, figure, report
from rewarder.pool import Job, VerifierPool
from rewarder.sandbox import isolation

DATA = Path(__file__).parents[1] / "tests" / "data"


def load(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (their own, not their children's)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def rate(pool: VerifierPool, jobs: list[Job]) -> tuple[float, float]:
    """(completions per second, CPU cores the workers got) over `jobs`; every one must score 1
    (a failure would flatter the rate)."""
    cpu, start = cpu_seconds(pool.pids), time.perf_counter()
    scores = pool.map(jobs)
    seconds = time.perf_counter() - start
    cores = (cpu_seconds(pool.pids) - cpu) / seconds
    bad = [s.error for s in scores if s.reward != 1.0]
    if bad:
        raise SystemExit(f"{len(bad)} reference solutions did not score 1: {bad[:3]}")
    return len(jobs) / seconds, cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--math", type=int, default=400, help="MATH-500 solutions to verify (<= 420)"
    )
    parser.add_argument("--code", type=int, default=100, help="HumanEval solutions to run (<= 154)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per worker count")
    add_output_args(parser)
    args = parser.parse_args()

    math500, humaneval = load("math500_test.jsonl"), load("humaneval.jsonl")
    math_jobs = [
        Job(r["solution"], r["answer"], {"accuracy_math": 1.0}) for r in math500[: args.math]
    ]
    math_jobs_warm = [
        Job(r["solution"], r["answer"], {"accuracy_math": 1.0}) for r in math500[-20:]
    ]
    code = [
        Job(
            r["prompt"] + r["canonical_solution"],
            {"entry_point": r["entry_point"], "test": r["test"], "prompt": r["prompt"]},
            {"code_tests": 1.0},
        )
        for r in humaneval
    ]
    code_jobs, code_jobs_warm = code[: args.code], code[-10:]
    say = print if not args.json else lambda *a: print(*a, file=sys.stderr)
    say(
        f"cpus={os.cpu_count()} sandbox isolation={isolation()} loadavg={os.getloadavg()[0]:.2f} at start"
    )
    rates: dict[int, dict[str, list[float]]] = {}
    for n in args.workers:
        rates[n] = {"math": [], "code": []}
        with VerifierPool(workers=n, timeout_s=60.0) as pool:
            # warm up on rows that are not measured (sympy caches what it has seen)
            pool.map(math_jobs_warm + code_jobs_warm[: 2 * n])
            for _ in range(args.runs):
                (math_rate, math_cores), (code_rate, _) = (
                    rate(pool, math_jobs),
                    rate(pool, code_jobs),
                )
                rates[n]["math"].append(math_rate)
                rates[n]["code"].append(code_rate)
                say(
                    f"workers={n}: math {math_rate:7.1f} verifications/s ({math_rate / n:6.1f} per "
                    f"worker, workers got {math_cores:.2f} cores)   code {code_rate:6.1f} runs/s"
                    f" ({code_rate / n:5.1f} per worker)"
                )
    base = rates[args.workers[0]]
    figures = [
        figure(
            f"rewards_{kind}_workers{n}",
            unit,
            rates[n][kind],
            base[kind] if n != args.workers[0] else None,
            workers=n,
            baseline_workers=args.workers[0],
        )
        for n in args.workers
        for kind, unit in (("math", "verifications/s"), ("code", "runs/s"))
    ]
    say(f"loadavg={os.getloadavg()[0]:.2f} at end")
    report(figures, args, "rewards")


if __name__ == "__main__":
    main()
