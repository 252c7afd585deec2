"""`aha rs`: R1's rejection sampling (DeepSeek-R1, section 2.3.3) over a samples file.

Each sample of each problem goes through the filters in `REASONS` order and is dropped for
the first one it fails: cut at the token limit, no reward (undecided), not correct, not
`<think>…</think>` then the answer, mixed languages in the thought, a code block in the thought
(unless the problem is a code task), an overlong paragraph, a duplicate of a sample kept
before it; of what is left, at most `max_per_prompt` per problem (the shortest, or a seeded
random choice). A share of non-reasoning pairs (R1's 200k of 800k) can be mixed in from a file.

The output is `{prompt, response, id, source}` JSONL, what `aha sft --data` reads, and next to
it `<out>.report.json` (`rs.jsonl` -> `rs.report.json`) counts every drop by its reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from pipeline.samples import ProblemSamples, Sample, read_samples
from protocol.config import CONFIG, ConfigError, read_jsonl
from rewarder.rewards import LANGUAGE_SCRIPTS, format_think, script_words, split_think

Reason = Literal[
    "truncated",
    "undecided",
    "incorrect",
    "malformed",
    "mixed_language",
    "code_in_thought",
    "long_paragraph",
    "duplicate",
    "over_limit",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
"""Why a sample is dropped, in the order the filters run (a sample counts for the first)."""

# [ \t], not \s: `^\s*` rescans the whole run of newlines from each line (quadratic).
CODE_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
CODE_REWARDS = frozenset({"code_tests"})
"""Rewards that make a problem a code task (code blocks allowed in its thought)."""


class FilterConfig(BaseModel):
    """The rejection-sampling filters and the mix (`aha rs` flags, a recipe's `rs` stage)."""

    model_config = CONFIG

    accuracy: str | None = None
    """The component that says a sample is right (== 1); None: the first `accuracy_*` or
    `code_tests` component a sample has, else its total reward against `min_reward`."""
    min_reward: float = 1.0
    """The total reward a sample without an accuracy component needs."""
    rewards: dict[str, float] | None = None
    """Score every sample again with these rewards (name -> weight) in the verifier pool;
    None: use the rewards the samples file carries."""
    answer_tag: bool = False
    """Well-formed means `<think>…</think><answer>…</answer>` and nothing else after the thought."""
    language: str = "en"
    """The language the thought must be written in (its script, as `language_consistency`)."""
    min_language_share: float = Field(0.95, ge=0, le=1)
    """Share of the thought's words that must be in `language`'s script (no words: consistent)."""
    code_task: bool | None = None
    """Whether code blocks may appear in the thought; None: when the problem is scored by
    `code_tests`."""
    max_paragraph_chars: int = Field(2000, ge=1)
    """Longest paragraph (text between blank lines) a kept sample may have."""
    max_per_prompt: int = Field(4, ge=1)
    """m: samples kept per problem at most."""
    pick: Literal["shortest", "random"] = "shortest"
    """Which m are kept when more pass: the shortest (tokens, else characters) or a seeded
    random choice."""
    seed: int = 0
    """Seed of the random pick and of the direct pairs' choice and the output order."""
    direct_share: float = Field(0.0, ge=0, lt=1)
    """Share of output lines taken from the non-reasoning pairs (R1: 200k of 800k = 0.25)."""
    skip: frozenset[Reason] = frozenset()
    """Filters not applied (a control: `skip` all but `over_limit` keeps samples unfiltered)."""


def is_code_task(problem: ProblemSamples, config: FilterConfig) -> bool:
    if config.code_task is not None:
        return config.code_task
    names = set(config.rewards or {})
    for sample in problem.samples:
        names |= set(sample.components or {})
    return bool(names & CODE_REWARDS)


def is_correct(sample: Sample, config: FilterConfig) -> bool | None:
    """True / False, or None when the sample has no reward (undecided or never scored)."""
    components = sample.components or {}
    name = config.accuracy or next(
        (c for c in components if c.startswith("accuracy_") or c in CODE_REWARDS), None
    )
    if name is not None and name in components:
        value = components[name]
        return None if value is None else value == 1.0
    if name is not None and config.accuracy is not None:
        return False  # asked for a component this sample was not scored by
    return None if sample.reward is None else sample.reward >= config.min_reward


def language_share(thought: str, language: str) -> float:
    """Share of the thought's words in `language`'s script; 1.0 without words (digits,
    symbols: nothing to mix)."""
    words = script_words(thought)
    if not words:
        return 1.0
    return sum(w in LANGUAGE_SCRIPTS[language] for w in words) / len(words)


def check_sample(sample: Sample, code_task: bool, config: FilterConfig) -> str | None:
    """The first reason in `REASONS` (not in `config.skip`) that drops `sample` on its own
    (before the duplicate and per-problem limits), or None if it passes."""
    for reason, failed in _checks(sample, code_task, config):
        if reason not in config.skip and failed():
            return reason
    return None


def _checks(sample: Sample, code_task: bool, config: FilterConfig):
    """(reason, whether the sample fails it) per filter, in order, each computed on demand."""
    task = SimpleNamespace(meta={"answer_tag": config.answer_tag})
    thought = split_think(sample.text)[0] or ""
    correct = is_correct(sample, config)
    paragraphs = PARAGRAPH_BREAK.split(sample.text)
    return [
        ("truncated", lambda: sample.finish_reason == "length"),
        ("undecided", lambda: correct is None),
        ("incorrect", lambda: correct is False),
        ("malformed", lambda: format_think(sample.text, task=task) != 1.0),
        (
            "mixed_language",
            lambda: language_share(thought, config.language) < config.min_language_share,
        ),
        ("code_in_thought", lambda: not code_task and bool(CODE_FENCE.search(thought))),
        ("long_paragraph", lambda: any(len(p) > config.max_paragraph_chars for p in paragraphs)),
    ]


def _length(sample: Sample) -> int:
    return sample.n_tokens if sample.n_tokens is not None else len(sample.text)


def select(
    problem: ProblemSamples, config: FilterConfig, rng: random.Random
) -> tuple[list[Sample], Counter]:
    """The samples of `problem` that are kept, and the count of each reason for the others."""
    drops: Counter = Counter()
    code_task = is_code_task(problem, config)
    passed: list[Sample] = []
    seen: set[str] = set()
    for sample in problem.samples:
        reason = check_sample(sample, code_task, config)
        key = " ".join(sample.text.split())
        if reason is None and key in seen and "duplicate" not in config.skip:
            reason = "duplicate"
        if reason is not None:
            drops[reason] += 1
            continue
        seen.add(key)
        passed.append(sample)
    if config.pick == "shortest":
        kept = sorted(passed, key=_length)[: config.max_per_prompt]  # stable: ties in order
    else:
        kept = rng.sample(passed, min(len(passed), config.max_per_prompt))
    drops["over_limit"] += len(passed) - len(kept)
    return kept, drops


def reject(
    problems: Sequence[ProblemSamples], config: FilterConfig
) -> tuple[list[dict], dict[str, Any]]:
    """(the kept samples as SFT rows, the counts) for `problems`."""
    rng = random.Random(config.seed)
    rows: list[dict] = []
    drops: Counter = Counter()
    problems_kept = 0
    for problem in problems:
        kept, problem_drops = select(problem, config, rng)
        drops += problem_drops
        problems_kept += bool(kept)
        rows += [
            {"prompt": problem.prompt, "response": s.text, "id": problem.id, "source": "rs"}
            for s in kept
        ]
    report = {
        "problems": len(problems),
        "samples": sum(len(p.samples) for p in problems),
        "kept": len(rows),
        "problems_kept": problems_kept,
        "dropped": {reason: drops[reason] for reason in REASONS},
    }
    return rows, report


def read_direct(path: str | Path) -> list[dict]:
    """Non-reasoning `{prompt, response}` pairs; a line without both strings names its line."""
    pairs = []
    for number, row in read_jsonl(path):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str):
                raise ConfigError(f"{field}: missing or not a string ({path}:{number})")
        pairs.append({"prompt": row["prompt"], "response": row["response"]})
    if not pairs:
        raise ConfigError(f"no pairs in the file ({path})")
    return pairs


def mix_direct(rows: list[dict], direct: Sequence[dict], config: FilterConfig) -> list[dict]:
    """`rows` plus direct pairs making `direct_share` of the result (as many as the file has,
    at most), in a seeded shuffled order; `rows` as they are when none is mixed in."""
    rng = random.Random(config.seed + 1)
    share = config.direct_share
    wanted = round(len(rows) * share / (1 - share)) if share else 0
    chosen = rng.sample(list(direct), min(wanted, len(direct)))
    if not chosen:
        return rows
    mixed = rows + [{**pair, "id": None, "source": "direct"} for pair in chosen]
    rng.shuffle(mixed)
    return mixed


def check_problem(problem: ProblemSamples, config: FilterConfig) -> None:
    """Raise ValueError for a line rs cannot use: no prompt, or unscored samples without
    `rewards` to score them."""
    if problem.prompt is None:
        raise ValueError("prompt: required by rs (the SFT pair's prompt)")
    if config.rewards is None:
        for i, sample in enumerate(problem.samples):
            if sample.reward is None and not sample.components and sample.error is None:
                raise ValueError(f"samples.{i}: not scored; give --rewards to score them")


def rescore(
    problems: list[ProblemSamples], config: FilterConfig, workers: int, timeout_s: float
) -> list[ProblemSamples]:
    """`problems` with every sample's reward, components and error from the verifier pool."""
    from rewarder.pool import Job, VerifierPool

    task = SimpleNamespace(meta={"answer_tag": config.answer_tag, "language": config.language})
    jobs = [Job(s.text, p.reference, config.rewards, task) for p in problems for s in p.samples]
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        scores = iter(pool.map(jobs))
    out = []
    for problem in problems:
        samples = []
        for sample in problem.samples:
            score = next(scores)
            update = {"reward": score.reward, "components": score.components, "error": score.error}
            samples.append(sample.model_copy(update=update))
        out.append(problem.model_copy(update={"samples": samples}))
    return out


def report_path(out: Path) -> Path:
    """`rs.jsonl` -> `rs.report.json`."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".report.json")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a killed run leaves
    either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_inputs(out: str | Path, config: FilterConfig, direct: str | Path | None) -> None:
    """Raise `ConfigError` for settings or paths rs cannot use, before any work."""
    if config.language not in LANGUAGE_SCRIPTS:
        raise ConfigError(f"language: no script known for {config.language!r}")
    if config.direct_share and direct is None:
        raise ConfigError("direct_share: needs a file of non-reasoning pairs (--direct FILE)")
    if direct is not None and not Path(direct).is_file():
        raise ConfigError(f"--direct: no such file ({direct})")
    if not Path(out).parent.is_dir():
        raise ConfigError(f"-o: no such folder ({Path(out).parent})")


def run_rs(
    samples_file: str | Path,
    out: str | Path,
    config: FilterConfig,
    *,
    direct: str | Path | None = None,
    workers: int = 2,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Filter `samples_file` into `out` (and its report); every input is checked first."""
    check_inputs(out, config, direct)
    out = Path(out)
    problems = read_samples(samples_file, check=lambda p: check_problem(p, config))
    direct_pairs = read_direct(direct) if direct is not None and config.direct_share else []
    if config.rewards is not None:
        problems = rescore(problems, config, workers, timeout_s)
    rows, report = reject(problems, config)
    rows = mix_direct(rows, direct_pairs, config)
    report["direct"] = sum(r["source"] == "direct" for r in rows)
    report["lines"] = len(rows)
    report["samples_from"] = str(samples_file)
    report["output"] = str(out)
    report["settings"] = config.model_dump(mode="json")
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(report_path(out), json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    """The counts as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rejection sampling: {report['problems']} problems")
    table.add_column("samples")
    table.add_column("count", justify="right")
    table.add_row("in", str(report["samples"]))
    for reason, count in report["dropped"].items():
        table.add_row(f"dropped: {reason.replace('_', ' ')}", str(count))
    table.add_row("kept", str(report["kept"]))
    table.add_row("problems with one kept", str(report["problems_kept"]))
    table.add_row("direct pairs mixed in", str(report["direct"]))
    Console().print(table)


def _filter_config(args) -> FilterConfig:
    from pydantic import ValidationError

    values = {
        "accuracy": args.accuracy,
        "min_reward": args.min_reward,
        "rewards": json.loads(args.rewards) if args.rewards else None,
        "answer_tag": args.answer_tag or None,
        "language": args.language,
        "max_paragraph_chars": args.max_paragraph_chars,
        "max_per_prompt": args.m,
        "pick": args.pick,
        "seed": args.seed,
        "direct_share": args.direct_share,
    }
    try:
        return FilterConfig.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        error = e.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


def sample_prompts(args, path: Path, config: FilterConfig) -> Path:
    """`aha rs --model DIR --prompts FILE --k N`: the model's scored samples of every prompt,
    written to `path`: through the bus (`pipeline.generate`; `--resume` continues the file), or
    with `--local` in this process. The prompts file is checked before anything starts."""
    from pipeline.generate import generate, read_prompt_file
    from pipeline.local_samples import PromptSettings, sample_locally
    from protocol.messages import Sampling

    if args.prompts is None or args.k is None:
        raise ConfigError("--model: needs --prompts FILE and --k N")
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: not an HF folder (no config.json) ({args.model})")
    rewards = config.rewards or {"accuracy_gsm8k": 1.0}
    problems = read_prompt_file(args.prompts, "prompt", "answer")
    sampling = Sampling(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    if args.local:
        settings = PromptSettings(rewards=rewards, answer_tag=config.answer_tag)
        return sample_locally(
            args.model, problems, path, k=args.k, sampling=sampling, settings=settings
        )
    return generate(
        args.model,
        problems,
        k=args.k,
        sampling=sampling,
        rewards=rewards,
        out=path,
        nats_url=args.nats_url,
        resume=args.resume,
        meta={"answer_tag": config.answer_tag},
        progress=sys.stderr.isatty(),
    )


def main(args) -> int:
    """The `aha rs` command."""
    try:
        config = _filter_config(args)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--rewards: not JSON: {e.msg}") from None
    out = Path(args.output)
    if (args.samples_from is None) == (args.model is None):
        raise ConfigError("give either --samples-from FILE or --model DIR (with --prompts, --k)")
    check_inputs(out, config, args.direct)
    samples = args.samples_from
    if samples is None:
        samples = sample_prompts(args, out.with_name(out.stem + ".samples.jsonl"), config)
        config = config.model_copy(update={"rewards": None})  # scored as they were sampled
    report = run_rs(
        samples, out, config, direct=args.direct, workers=args.workers, timeout_s=args.timeout
    )
    print_report(report)
    print(f"{report['lines']} pairs -> {out}; counts -> {report_path(out)}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0
