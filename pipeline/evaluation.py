"""`aha eval --samples-from FILE --bench NAME -o DIR`: R1's evaluation of samples that
already exist (no generation).

Steps: read and check every line of the samples file (`pipeline.samples`) and the output
folder, before any scoring; score every sample with the benchmark's rewards in the rewarder's
verifier pool (per-call timeout, sandbox, `reward: null` with the reason when a verifier
cannot decide); extract each sample's final answer and group equivalent answers for the vote
(Math-Verify's comparisons run in the same pool, under the same timeout); compute the metrics
(`pipeline.metrics`); write `DIR/summary.json` and `DIR/scored.jsonl`; print a table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.benchmarks import Benchmark, get_benchmark
from pipeline.metrics import REFLECTION_WORDS, ScoredSample, group_answers, summarize
from pipeline.samples import ProblemSamples, SamplesError, read_samples
from protocol.messages import Score
from rewarder.pool import Job, VerifierPool
from rewarder.rewards import final_answer
from rewarder.service import extract_answer as answer_of

SUMMARY, SCORED = "summary.json", "scored.jsonl"
"""What `aha eval` writes in its output folder."""


def extract_answer(bench: Benchmark, text: str) -> str | None:
    """The answer a sample votes with, as the rewarder reports it on the bus
    (`rewarder.service.extract_answer` with the benchmark's rewards): its final answer
    (`math`, whitespace runs made one space), its number (`number`, as a fraction's text:
    `7/2`), or None (no answer, or a benchmark without votes)."""
    return answer_of(text, bench.rewards)


def _as_answer(answer: str) -> str:
    """`answer` as a completion whose final answer is exactly `answer`."""
    return f"<answer>{answer}</answer>"


def check_output(folder: Path) -> None:
    """Raise `SamplesError` unless `folder` can take the results (made if missing); results
    already there are never overwritten."""
    if folder.exists() and not folder.is_dir():
        raise SamplesError(f"-o: not a directory ({folder})")
    for name in (SUMMARY, SCORED):
        if (folder / name).exists():
            raise SamplesError(f"-o: {name} exists; choose another folder ({folder / name})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamplesError(f"-o: cannot make the folder: {e.strerror or e} ({folder})") from e


def check_problem(problem: ProblemSamples, bench: Benchmark) -> None:
    """Raise ValueError for a line of another benchmark or a reference the benchmark's
    rewards cannot read."""
    if problem.bench is not None and problem.bench != bench.name:
        raise ValueError(f"bench: {problem.bench!r}, but --bench is {bench.name!r}")
    bench.check_reference(problem.reference)


def _run(
    pool: VerifierPool, jobs: list[Job], what: str, progress: bool
) -> tuple[list[Score], dict]:
    """Scores of `jobs` in order, and the pool's notes by job index."""
    if not progress or not jobs:
        return pool.map(jobs), dict(pool.notes)
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:  # stdout is for the table and --json
        task = bar.add_task(what, total=len(jobs))
        scores = pool.map(jobs, on_score=lambda i, s: bar.advance(task))
    return scores, dict(pool.notes)


def vote_groups(
    answers: list[list[str | None]], pool: VerifierPool, progress: bool
) -> list[list[int | None]]:
    """Each problem's vote groups (`pipeline.metrics.group_answers`): distinct answers of one
    problem are compared by `accuracy_math` in the pool, the earlier one as the reference."""
    pairs: dict[tuple[str, str], int] = {}
    for problem in answers:
        distinct = list(dict.fromkeys(a for a in problem if a is not None))
        for i, first in enumerate(distinct):
            for later in distinct[i + 1 :]:
                if final_answer(_as_answer(later)) == later:  # else only equal text is one vote
                    pairs.setdefault((first, later), len(pairs))
    jobs = [Job(_as_answer(b), a, {"accuracy_math": 1.0}) for a, b in pairs]
    scores, _ = _run(pool, jobs, "comparing answers", progress)
    same = {pair for pair, i in pairs.items() if scores[i].reward == 1.0}
    return [group_answers(problem, lambda a, b: (a, b) in same) for problem in answers]


def evaluate(
    problems: Sequence[ProblemSamples],
    bench: Benchmark,
    workers: int = 2,
    timeout_s: float = 30.0,
    words: Sequence[str] = REFLECTION_WORDS,
    progress: bool = False,
    scored_by_rewarders: bool = False,
) -> tuple[dict, list[dict]]:
    """(the benchmark's metrics, one result row per sample) for `problems`.

    `scored_by_rewarders`: the samples carry the rewarders' scores for the benchmark's rewards
    (what `aha generate` wrote); they are used as they are instead of scoring again."""
    jobs = [Job(s.text, p.reference, bench.rewards) for p in problems for s in p.samples]
    answers = [[extract_answer(bench, s.text) for s in p.samples] for p in problems]
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        if scored_by_rewarders:
            scores = [rewarders_score(s) for p in problems for s in p.samples]
            notes = {}
        else:
            scores, notes = _run(pool, jobs, f"scoring {bench.name}", progress)
        if bench.vote == "math":
            groups = vote_groups(answers, pool, progress)
        else:
            groups = [group_answers(a, lambda x, y: False) for a in answers]
    scored: list[list[ScoredSample]] = []
    rows: list[dict] = []
    index = 0
    for problem, problem_answers, problem_groups in zip(problems, answers, groups, strict=True):
        scored.append([])
        for number, (sample, answer, group) in enumerate(
            zip(problem.samples, problem_answers, problem_groups, strict=True)
        ):
            score = scores[index]
            correct = None if score.reward is None else score.components.get(bench.accuracy) == 1.0
            scored[-1].append(
                ScoredSample(
                    sample.text, correct, score.reward, group, sample.finish_reason, sample.n_tokens
                )
            )
            rows.append(
                {
                    "id": problem.id,
                    "sample": number,
                    "reward": score.reward,
                    "components": score.components,
                    "error": score.error,
                    "note": notes.get(index),
                    "correct": correct,
                    "answer": answer,
                    "vote": group,
                    "finish_reason": sample.finish_reason,
                    "n_tokens": sample.n_tokens,
                }
            )
            index += 1
    return summarize(scored, vote=bench.vote is not None, words=words), rows


def rewarders_score(sample) -> Score:
    """The score a samples-file entry carries (as the rewarders gave it)."""
    return Score(reward=sample.reward, components=sample.components or {}, error=sample.error)


def print_table(name: str, metrics: dict[str, Any]) -> None:
    """The summary as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    table = Table(title=f"{name}: {metrics['problems']} problems × {metrics['k']} samples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    stderr = metrics["pass_at_1_stderr"]
    spread = "" if stderr is None else f" ± {pct(stderr)}"
    table.add_row("pass@1 (%), ± standard error", pct(metrics["pass_at_1"]) + spread)
    for k, value in list(metrics["pass_at_k"].items())[1:]:  # pass@1 above
        table.add_row(f"pass@{k} (%)", pct(value))
    for k, value in (metrics["cons_at_k"] or {}).items():
        table.add_row(f"cons@{k} (%)", pct(value))
    for key in ("undecided", "truncated", "unrewarded", "no_answer", "reflection_share"):
        table.add_row(f"{key.replace('_', ' ')} (%)", pct(metrics[key]))
    unit, think = metrics["length_unit"], metrics["think_length_unit"]
    table.add_row(
        f"length, mean / median ({unit})",
        f"{metrics['mean_length']:.1f} / {metrics['median_length']:g}",
    )
    table.add_row(
        f"thought, mean / median ({think})",
        f"{metrics['mean_think_length']:.1f} / {metrics['median_think_length']:g}",
    )
    Console().print(table)


def main(args) -> int:
    """The `aha eval` command: a samples file (`--samples-from`), or a model through the bus
    (`--model`)."""
    if args.model is not None:
        return main_model(args)
    if args.samples_from is None or args.bench is None:
        raise SamplesError("--samples-from FILE --bench NAME, or --model DIR")
    bench = get_benchmark(args.bench)
    source, out = Path(args.samples_from), Path(args.output)
    words = reflection_words(args)
    problems = read_samples(source, args.k, lambda problem: check_problem(problem, bench))
    check_output(out)
    progress = sys.stderr.isatty()
    metrics, rows = evaluate(problems, bench, args.workers, args.timeout, words, progress)
    metrics["settings"] = {
        "samples_from": str(source),
        **_settings(bench, args, words),
    }
    write_results(out, {bench.name: metrics}, rows)
    print_table(bench.title, metrics)
    print(f"{len(rows)} samples of {len(problems)} problems scored -> {out}", file=sys.stderr)
    if args.json:
        print(json.dumps({bench.name: metrics}, allow_nan=False))
    return 0


def reflection_words(args) -> tuple[str, ...]:
    return tuple(w.strip() for w in args.reflection_words.split(",") if w.strip())


def _settings(bench: Benchmark, args, words) -> dict:
    return {
        "rewards": bench.rewards,
        "correct": f"{bench.accuracy} = 1",
        "template": bench.template,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "reflection_words": list(words),
        "ties": "the answer given first among the n samples",
    }


def write_results(out: Path, summary: dict, rows: list[dict]) -> None:
    with open(out / SCORED, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


R1_K, R1_TEMPERATURE, R1_TOP_P = 64, 0.6, 0.95
"""R1's evaluation protocol, `aha eval --model`'s defaults: k samples per problem at
temperature 0.6 and top-p 0.95 (R1.md, "Evaluation")."""


def eval_settings(args) -> tuple[list[Benchmark], int, Any]:
    """The benchmarks, k and sampling of `aha eval --model`, checked before anything starts:
    `--greedy` is one sample at temperature 0 (refused with a flag it would override)."""
    from protocol.messages import Sampling

    names = [n.strip() for n in (args.bench or "").split(",") if n.strip()]
    if not names:
        raise SamplesError("--bench: name at least one benchmark")
    benches = [get_benchmark(n) for n in names]
    if args.greedy:
        flags = {"--k": args.k, "--temperature": args.temperature, "--top-p": args.top_p}
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise SamplesError(f"--greedy is one sample at temperature 0: drop {', '.join(given)}")
        k, temperature, top_p = 1, 0.0, 1.0
    else:
        k = R1_K if args.k is None else args.k
        temperature = R1_TEMPERATURE if args.temperature is None else args.temperature
        top_p = R1_TOP_P if args.top_p is None else args.top_p
    if k < 1:
        raise SamplesError(f"--k: {k}, must be at least 1")
    sampling = Sampling(
        temperature=temperature, top_p=top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    return benches, k, sampling


def main_model(args) -> int:
    """`aha eval --model DIR --bench A,B`: each benchmark's problems (the first `--limit`)
    through `pipeline.generate` (resumable: `DIR/<bench>.samples.jsonl`), the rewarders'
    scores summarised as `--samples-from` does."""
    from pipeline.generate import generate
    from protocol.config import BusConfig, load_config
    from protocol.log import setup_logging

    benches, k, sampling = eval_settings(args)  # a bad flag refused before anything starts
    setup_logging("eval")  # stderr: stdout is for the tables and --json
    bus = load_config(BusConfig, None, section="bus")  # AHA_BUS__USER, … from the environment
    out, words = Path(args.output), reflection_words(args)
    check_output(out)
    summary, rows = {}, []
    for bench in benches:
        chosen = bench.problems()[: args.limit]
        problems = [
            {"id": p.id, "bench": bench.name, "prompt": bench.prompt(p), "reference": p.reference}
            for p in chosen
        ]
        path = out / f"{bench.name}.samples.jsonl"
        generate(
            args.model,
            problems,
            k=k,
            sampling=sampling,
            rewards=bench.rewards,
            out=path,
            nats_url=args.nats_url,
            resume=path.exists(),
            window=args.window,
            engine=args.engine,
            bus=bus,
            progress=sys.stderr.isatty(),
        )
        samples = read_samples(path, k, lambda problem, b=bench: check_problem(problem, b))
        metrics, bench_rows = evaluate(
            samples, bench, args.workers, args.timeout, words, scored_by_rewarders=True
        )
        metrics["settings"] = {
            "model": str(args.model),
            "sampling": sampling.model_dump(),
            "samples": str(path),
            **_settings(bench, args, words),
        }
        summary[bench.name] = metrics
        rows += [{"bench": bench.name, **row} for row in bench_rows]
        print_table(bench.title, metrics)
    write_results(out, summary, rows)
    print(f"{len(rows)} samples of {len(benches)} benchmarks -> {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    return 0
