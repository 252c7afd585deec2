"""Sample efficiency of `aha up`'s demo, one change at a time (issue 12, item 4).

    python benchmarks/efficiency.py [--steps N] [--variants a,b,...] [--cold-start PATH]
                                    [--heads 4 --engine hf] [--json]

Every variant is `aha up --model COLD --max-steps N` from ONE cold-start model (the demo's,
made once unless `--cold-start` names one), on the same prompts, held-out set and seed; a
variant differs from the demo's defaults (`pipeline.presets.DEMO_LEARNER`) only by the
`--set`/flags it names. Variants run one after another (never two at once: they would share
the cores). Printed per variant: held-out pass@1 (temperature 1, `--eval-samples` samples on
each of `--eval-problems` problems) and greedy accuracy of the final model, the steps, the
RL phase's seconds and the training-sample accuracy of the last 5 steps. With `--json` one
line per variant in the format of `benchmarks/figures.py`: figure `efficiency_pass_at_1`,
value the variant's pass@1, baseline the `--baseline` variant's pass@1 of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its modules would shadow
# the project's packages (benchmarks/learner.py vs `learner`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.figures import add_output_args, figure, report  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "sync": ["--max-staleness", "0"],
    "1-step": ["--set", "learner.grpo.ppo_epochs=1", "--set", "learner.grpo.minibatches=1"],
    "2-steps": ["--set", "learner.grpo.ppo_epochs=2", "--set", "learner.grpo.minibatches=1"],
    "4-steps": ["--set", "learner.grpo.ppo_epochs=2", "--set", "learner.grpo.minibatches=2"],
    "4-steps-sync": [
        "--max-staleness",
        "0",
        "--set",
        "learner.grpo.ppo_epochs=2",
        "--set",
        "learner.grpo.minibatches=2",
    ],
    "4-steps-lr-2e-4": [
        "--set",
        "learner.grpo.ppo_epochs=2",
        "--set",
        "learner.grpo.minibatches=2",
        "--set",
        "learner.optim.lr=2e-4",
    ],
    "batch-32": ["--set", "learner.batch=32"],
    "no-is": ["--set", "learner.grpo.is_cap=null"],
    "lr-2e-4": ["--set", "learner.optim.lr=2e-4"],
    "beta-0": ["--set", "learner.grpo.beta=0"],
}
"""Each variant's `aha up` flags over the demo's defaults."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per variant")
    p.add_argument(
        "--variants",
        default="default,sync,2-steps,4-steps",
        help=f"comma-separated, run in this order; known: {', '.join(VARIANTS)}",
    )
    p.add_argument("--baseline", default="default", help="the variant the others are set beside")
    p.add_argument("--cold-start", help="reuse this cold-start HF folder instead of making one")
    p.add_argument("--cold-start-steps", type=int, default=1400, help="SFT steps of the cold start")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per problem for pass@1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["vllm", "hf"], help="the actors' engine (default: aha's)")
    p.add_argument(
        "--heads",
        type=int,
        default=2,
        help="attention heads of the tiny model the cold start trains (4: DEMO.md's heads of 16, "
        "which only the HF engine runs: give --engine hf)",
    )
    p.add_argument(
        "--head-dim",
        type=int,
        help="width of each head; set, the model is a qwen3 (vLLM's Qwen2 ignores head_dim): "
        "--heads 4 --head-dim 32 is 4 heads vLLM's CPU attention runs",
    )
    p.add_argument(
        "--recipe",
        choices=["think-or-guess", "buggy-carries"],
        default="think-or-guess",
        help="the cold start's data (pipeline.coldstart.RECIPES)",
    )
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where the variants' runs go")
    p.add_argument("--name", help="benchmark run name (default: bench-efficiency-<time>)")
    add_output_args(p)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in [*args.variants, args.baseline] if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.baseline not in args.variants:
        p.error(f"--baseline {args.baseline} is not among --variants")
    return args


def say(*parts) -> None:
    print(f"[efficiency {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def cold_start(args, bench_dir: Path) -> Path:
    """The one model every variant starts from."""
    if args.cold_start:
        return Path(args.cold_start).resolve()
    from pipeline.coldstart import cold_start_model, demo_data

    (bench_dir / "logs").mkdir(parents=True, exist_ok=True)
    _, held_out = demo_data(
        bench_dir, eval_problems=args.eval_problems, rl_problems=2000, seed=args.seed
    )
    say(f"cold start: {args.cold_start_steps} SFT steps ({args.recipe}), {args.heads} heads")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return cold_start_model(
        bench_dir,
        held_out,
        steps=args.cold_start_steps,
        recipe=args.recipe,
        seed=args.seed,
        env=env,
        spec=model_spec(args),
    )


def model_spec(args):
    """The tiny model `--heads`/`--head-dim` name (`--heads 2`: the demo's own)."""
    from pipeline.tiny_model import TinySpec

    return TinySpec(
        num_heads=args.heads,
        num_kv_heads=args.heads,
        head_dim=args.head_dim,
        model_type="qwen2" if args.head_dim is None else "qwen3",
    )


def run_variant(args, bench_dir: Path, name: str, model: Path) -> dict:
    """`aha up` with the variant's flags; its summary and training curve, reduced."""
    config = bench_dir / "efficiency.toml"
    config.write_text(
        f"[up]\nruns_dir = {json.dumps(str(bench_dir))}\neval_problems = {args.eval_problems}\n"
        f"eval_samples = {args.eval_samples}\nseed = {args.seed}\n"
    )
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--json", "--name", name]
    cmd += ["--config", str(config), "--model", str(model), "--max-steps", str(args.steps)]
    cmd += VARIANTS[name] + (["--engine", args.engine] if args.engine else [])
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}  # its own embedded server
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    say(f"{name}: {' '.join(VARIANTS[name]) or '(the defaults)'}")
    with open(bench_dir / f"{name}.stderr.log", "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise SystemExit(
            f"aha up {name} exited {proc.returncode} without a summary; see "
            f"{bench_dir / (name + '.stderr.log')}"
        ) from e
    metrics = bench_dir / name / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    accuracy = [r["accuracy"] for r in steps if r.get("event") == "step"]
    return {
        "variant": name,
        "flags": VARIANTS[name],
        "pass_at_1": summary.get("pass_at_1_after"),
        "pass_at_1_before": summary.get("pass_at_1_before"),
        "greedy": summary.get("accuracy_after"),
        "steps": summary.get("steps"),
        "rl_s": summary.get("rl_seconds"),
        "sample_accuracy_last5": round(statistics.fmean(accuracy[-5:]), 4) if accuracy else None,
        "max_staleness_trained": summary.get("max_staleness_trained"),
        "run_dir": summary.get("run_dir"),
    }


def table(rows: list[dict]) -> str:
    head = f"{'variant':14s} {'pass@1':>7s} {'greedy':>7s} {'steps':>6s} {'RL s':>6s} {'train acc':>9s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['variant']:14s} {r['pass_at_1']:7.3f} {r['greedy']:7.3f} {r['steps']:6d} "
            f"{r['rl_s']:6.0f} {r['sample_accuracy_last5']:9.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    name = args.name or time.strftime("bench-efficiency-%Y%m%d-%H%M%S")
    bench_dir = Path(args.runs_dir).resolve() / name
    bench_dir.mkdir(parents=True, exist_ok=True)
    model = cold_start(args, bench_dir)
    rows = []
    for variant in args.variants:
        rows.append(run_variant(args, bench_dir, variant, model))
        say(json.dumps(rows[-1]))
        (bench_dir / "efficiency.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = next(r for r in rows if r["variant"] == args.baseline)
    print(table(rows), file=sys.stderr if args.json else sys.stdout, flush=True)
    figures = [
        figure(
            "efficiency_pass_at_1",
            "pass@1",
            [r["pass_at_1"]],
            [base["pass_at_1"]],
            **{k: v for k, v in r.items() if k != "pass_at_1"},
        )
        for r in rows
    ]
    report(figures, args, "efficiency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
