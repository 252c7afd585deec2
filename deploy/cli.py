"""`aha`: one command, a subcommand per process or tool.

Parsing stays import-light (argparse, no torch/vLLM/DeepSpeed, no nats) so `aha --help` is
instant; each subcommand imports what it needs only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Command = Callable[[argparse.ArgumentParser], None]
COMMANDS: list[tuple[str, str, Command]] = []


def command(name: str, help: str):
    """Register `add_arguments(parser)` for subcommand `name`; it must set `func`."""

    def register(add_arguments: Command) -> Command:
        COMMANDS.append((name, help, add_arguments))
        return add_arguments

    return register


def _positive(kind: type):
    """An argparse type: a number of `kind` above 0 (argparse names the flag when it is not)."""

    def parse(text: str):
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _float_where(holds: Callable[[float], bool], wanted: str):
    """An argparse type: a float for which `holds` is true (argparse names the flag when not)."""

    def parse(text: str) -> float:
        value = float(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


TEMPERATURE = _float_where(lambda t: 0 <= t < float("inf"), "a finite number at least 0")
"""A `--temperature` (`protocol.messages.Sampling`: 0 is greedy; nan and inf are refused)."""
TOP_P = _float_where(lambda p: 0 < p <= 1, "above 0 and at most 1")
"""A `--top-p`: the nucleus mass (`protocol.messages.Sampling`)."""


def _add_bus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (TOML or YAML) with a [bus] section")
    p.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL)")


def _add_set(p: argparse.ArgumentParser) -> None:
    """`--set SECTION.FIELD=VALUE` on a command that reads a config (it has `--config`)."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any config field, over the file and the flags (repeatable); VALUE is TOML "
        '(0.6, true, "text", [1, 2]) or plain text: --set learner.grpo.beta=0',
    )


def _bus_config(args: argparse.Namespace):
    from protocol.config import BusConfig, config_from_args

    return config_from_args(BusConfig, args, "bus", {"url": args.nats_url})


@command("nats", "run an embedded NATS server with aha's streams, in the foreground")
def _nats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="JetStream storage directory (default: a temporary one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=-1, help="client port (default: a free one)")
    p.add_argument("--http-port", type=int, default=-1, help="monitoring port (default: free)")
    p.add_argument("--config", help="config file with a [bus] section (stream settings)")
    p.add_argument("--server-config", help="nats-server config file (users, TLS)")

    def run(args):
        from deploy.nats import main

        args.nats_url = None
        return main(args, _bus_config(args))

    p.set_defaults(func=run)


@command("top", "queue depth per stage: live table, one JSON line, or Prometheus gauges")
def _top(p: argparse.ArgumentParser) -> None:
    _add_bus_args(p)
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--json", action="store_true", help="print a JSON object keyed by stage")
    p.add_argument("--interval", type=float, default=1.0, help="refresh seconds")
    p.add_argument(
        "--stall-after",
        type=float,
        metavar="S",
        help="report a stage with work waiting and no progress for S seconds (default 60)",
    )
    p.add_argument(
        "--prometheus", type=int, metavar="PORT", help="serve the numbers as Prometheus gauges"
    )

    def run(args):
        from deploy.top import main

        return main(args, _bus_config(args))

    p.set_defaults(func=run)


@command(
    "rewarder",
    "score rollouts from the bus with the rule-based rewards (a verifier pool per process)",
)
def _rewarder(p: argparse.ArgumentParser) -> None:
    _add_bus_args(p)
    p.add_argument("--workers", type=int, help="verifier processes (default: rewarder.workers)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")

    def run(args):
        from rewarder.service import main

        return main(args)

    p.set_defaults(func=run)


@command("score", "score completions offline with aha's rewards (JSONL in, JSONL out)")
def _score(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help='JSONL: {"completion", "reference", "rewards": {name: weight}}')
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="JSONL out: each line plus reward, components, error (written as scored, in input order)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep OUTPUT's lines, score only the rest (without it an existing OUTPUT is refused)",
    )
    p.add_argument(
        "--config", help="config file: its [rewarder] section (workers, timeout_s, sandbox)"
    )
    p.add_argument(
        "--workers", type=_positive(int), help="verifier processes (default: rewarder.workers)"
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        help="seconds per completion before it gets no reward (default: rewarder.timeout_s)",
    )

    def run(args):
        from rewarder.score import main

        return main(args)

    p.set_defaults(func=run)


def _add_eval_sampling_args(p: argparse.ArgumentParser) -> None:
    """`aha eval --model`'s sampling and bus flags (R1's protocol as the defaults)."""
    p.add_argument("--temperature", type=TEMPERATURE, help="--model: default 0.6 (R1's)")
    p.add_argument("--top-p", type=TOP_P, help="--model: default 0.95 (R1's)")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="--model: one sample at temperature 0 instead (not with --k, --temperature, --top-p)",
    )
    p.add_argument(
        "--max-tokens", type=_positive(int), default=32768, help="--model: default 32768 (R1's)"
    )
    p.add_argument("--seed", type=int, default=0, help="--model: sampling seed")
    p.add_argument(
        "--limit", type=_positive(int), help="--model: the first N problems of each benchmark"
    )
    p.add_argument(
        "--nats-url", help="--model: use this bus's actors and rewarders (default: embedded)"
    )
    p.add_argument("--window", type=_positive(int), default=64, help="--model: tasks in flight")
    p.add_argument("--engine", choices=["vllm", "hf"], help="--model: embedded actors' engine")


@command(
    "eval",
    "R1's evaluation (pass@1, pass@k, cons@k, lengths, reflection): a model or a samples file",
)
def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="HF folder: sample each benchmark's problems through the bus (aha generate), then score",
    )
    p.add_argument(
        "--samples-from",
        metavar="FILE",
        help='or JSONL, a line per problem: {"id", "reference", "samples": [{"text", "n_tokens"?, "finish_reason"?}]}; scored again with the benchmark\'s rewards',
    )
    p.add_argument(
        "--bench",
        help="gsm8k, math500, aime24, amc23 or humaneval (with --model: several, comma-separated)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="folder for summary.json and scored.jsonl (never overwritten; with --model also <bench>.samples.jsonl, resumed when there)",
    )
    p.add_argument(
        "--k",
        type=_positive(int),
        help="samples per problem (--model: default 64, R1's; --samples-from: the first K of each line, default all)",
    )
    _add_eval_sampling_args(p)
    p.add_argument("--workers", type=_positive(int), default=2, help="verifier processes")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=30.0,
        help="seconds per verifier call before a sample gets no reward",
    )
    p.add_argument(
        "--reflection-words",
        default="wait,recheck,re-check,double-check,re-evaluate,reconsider",
        metavar="W1,W2",
        help="words inside <think> that count as reflecting",
    )
    p.add_argument(
        "--json", action="store_true", help="print summary.json as the last line of stdout"
    )

    def run(args):
        from pipeline.evaluation import main

        return main(args)

    p.set_defaults(func=run)


@command("export", "write a learner checkpoint as an HF folder that from_pretrained loads")
def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config file with a [learner] section")
    p.add_argument("--out", required=True, help="folder to write (config, shards, tokenizer)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: learner.checkpoint_dir)")
    p.add_argument("--tag", help="checkpoint tag (default: the latest)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: learner.serving_dtype"
    )

    def run(args):
        from learner.commands import export

        return export(args)

    p.set_defaults(func=run)


@command("sft", "supervised fine-tuning on prompt/response pairs (loss on the response only)")
def _sft(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config file with a [learner] section")
    p.add_argument("--data", required=True, help="JSONL file of {prompt, response} objects")
    p.add_argument("--out", required=True, help="HF folder to write the fine-tuned model to")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch", type=int, help="examples per step (default: learner.batch)")
    p.add_argument("--prompt-field", default="prompt", help="JSON field of the prompt")
    p.add_argument("--response-field", default="response", help="JSON field of the response")

    def run(args):
        from learner.commands import sft

        return sft(args)

    p.set_defaults(func=run)


@command("actor", "generate rollouts for tasks from the bus, serving the latest published weights")
def _actor(p: argparse.ArgumentParser) -> None:
    _add_bus_args(p)
    p.add_argument("--actor-id", help="name in rollouts and logs (default: host-pid)")
    p.add_argument("--model", help="HF folder (default: actor.model)")

    def run(args):
        from actors.service import main

        return main(args)

    p.set_defaults(func=run)


@command("learner", "the GRPO learner: issue tasks, train on scored groups, publish weights")
def _learner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config file with [learner] and [bus] sections")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint (required to exist); without it, one found is resumed too",
    )
    p.add_argument(
        "--max-steps", type=int, help="stop after this many steps (default: learner.max_steps)"
    )
    p.add_argument("--nats-url", help="NATS server URL (default: bus.url or $NATS_URL)")

    def run(args):
        from learner.commands import learner

        return learner(args)

    p.set_defaults(func=run)


@command("up", "the whole loop on one machine: embedded NATS, learner, actors, rewarders, demo")
def _up(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file; its [up] section sets the options below")
    p.add_argument("--model", help="HF causal-LM folder to train (default: the demo's tiny model)")
    p.add_argument("--dataset", help="prompt JSONL: GSM8K or MATH-500 format (default: the demo)")
    p.add_argument("--actors", type=int, help="actor processes (default 1)")
    p.add_argument("--rewarders", type=int, help="rewarder processes (default 1)")
    p.add_argument("--max-steps", type=int, help="learner.max_steps: GRPO steps (demo: 60)")
    p.add_argument(
        "--max-staleness", type=int, help="learner.max_staleness: off-policy bound (default 2)"
    )
    p.add_argument(
        "--engine", choices=["vllm", "hf"], help="actors' engine (default: vllm if installed)"
    )
    p.add_argument("--cold-start-steps", type=int, help="demo cold-start SFT steps (default 1000)")
    p.add_argument("--name", help="run name: runs/<name>/ (default: the start time)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run --name (default: the latest): its cold start, checkpoint, queues",
    )
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument(
        "--json", action="store_true", help="print the summary as the last line of stdout"
    )
    p.add_argument(
        "--shuffle-rewards",
        action="store_true",
        help="control experiment: rewards permuted across each batch (nothing should be learned)",
    )

    def run(args):
        from deploy.up import main

        return main(args)

    p.set_defaults(func=run)


@command("rs", "R1's rejection sampling: keep the correct, clean samples as SFT pairs")
def _rs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples-from", metavar="FILE", help="samples file (what aha generate writes)")
    p.add_argument("--model", help="HF folder to sample from (instead of --samples-from)")
    p.add_argument("--prompts", help="with --model: JSONL of {prompt, answer}")
    p.add_argument("--k", type=_positive(int), help="with --model: samples per prompt")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="with --model (default 1)")
    p.add_argument("--top-p", type=TOP_P, default=1.0, help="with --model (default 1)")
    p.add_argument("--max-tokens", type=_positive(int), default=64, help="with --model")
    p.add_argument("--nats-url", help="with --model: sample with the actors on this bus")
    p.add_argument("--resume", action="store_true", help="with --model: continue the samples")
    p.add_argument("--local", action="store_true", help="with --model: sample in this process")
    p.add_argument("-o", "--output", required=True, help="SFT pairs JSONL (report next to it)")
    p.add_argument("--m", type=int, help="samples kept per prompt at most (default 4)")
    p.add_argument("--pick", choices=["shortest", "random"], help="which m (default shortest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pick and the mix")
    p.add_argument(
        "--rewards",
        help='JSON {"accuracy_math": 1.0, ...}: score every sample again with these (with '
        "--model: the rewards it is scored with; default accuracy_gsm8k)",
    )
    p.add_argument("--accuracy", help="the component that must be 1 (default: accuracy_*)")
    p.add_argument("--min-reward", type=float, help="without an accuracy component (default 1)")
    p.add_argument("--answer-tag", action="store_true", help="well-formed needs <answer>…</answer>")
    p.add_argument("--language", help="language of the thought (default en)")
    p.add_argument("--max-paragraph-chars", type=int, help="longest paragraph (default 2000)")
    p.add_argument("--direct", metavar="FILE", help="non-reasoning {prompt, response} pairs")
    p.add_argument("--direct-share", type=float, help="their share of the output (R1: 0.25)")
    p.add_argument("--workers", type=_positive(int), default=2, help="verifier processes")
    p.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds per sample")
    p.add_argument("--json", action="store_true", help="print the report as the last line")

    def run(args):
        from pipeline.rs import main

        return main(args)

    p.set_defaults(func=run)


@command("distill", "R1's distillation: the teacher's filtered samples, then SFT of the student")
def _distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="HF folder whose samples are learned")
    p.add_argument("--student", required=True, help="HF folder to fine-tune (any size/tokenizer)")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt, answer}")
    p.add_argument("-o", "--output", required=True, help="folder: samples, rs.jsonl, model/")
    p.add_argument("--k", type=_positive(int), help="teacher samples per prompt (default 4)")
    p.add_argument("--m", type=_positive(int), help="kept per prompt at most (default 4)")
    p.add_argument("--temperature", type=TEMPERATURE, help="teacher temperature (default 1)")
    p.add_argument("--max-tokens", type=_positive(int), help="longest sample (default 64)")
    p.add_argument("--steps", type=_positive(int), help="student SFT steps (default 100)")
    p.add_argument("--batch", type=_positive(int), help="examples per step (default 64)")
    p.add_argument("--lr", type=_positive(float), help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--local", action="store_true", help="teacher samples in this process")
    p.add_argument("--json", action="store_true", help="print the counts as the last line")

    def run(args):
        from pipeline.distill import main

        return main(args)

    p.set_defaults(func=run)


@command("pipeline", "R1's stages (sft, grpo, rs, eval, distill) from a recipe, resumable")
def _pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe TOML: [pipeline] and [[stages]]")
    p.add_argument("--demo", action="store_true", help="run recipes/r1-demo.toml")
    p.add_argument("--resume", action="store_true", help="skip the stages done and unchanged")
    p.add_argument("--name", help="run folder name (default: the recipe's [pipeline] name)")
    p.add_argument("--json", action="store_true", help="print the summary as the last line")

    def run(args):
        from pipeline.recipe import main

        return main(args)

    p.set_defaults(func=run)


@command("generate", "k samples per prompt from a model folder, through the bus, scored")
def _generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder to sample from")
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='JSONL, a line per problem: {"id"?, "prompt", "answer"} (the prompt as the model sees it)',
    )
    p.add_argument("--prompt-field", default="prompt", help="JSON field of the prompt")
    p.add_argument("--answer-field", default="answer", help="JSON field of the reference")
    p.add_argument("--k", type=int, default=1, help="samples per problem (default 1)")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.6, help="default 0.6 (R1's)")
    p.add_argument("--top-p", type=TOP_P, default=0.95, help="default 0.95 (R1's)")
    p.add_argument("--max-tokens", type=_positive(int), default=1024, help="default 1024")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each task its own)")
    p.add_argument(
        "--rewards",
        required=True,
        metavar="NAME[=W],...",
        help="rewards scored for every sample, e.g. accuracy_math,format_think=0.1",
    )
    p.add_argument(
        "--answer-tag",
        action="store_true",
        help="only an <answer>...</answer> counts as the answer (meta.answer_tag)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="samples JSONL, a line per problem"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep OUTPUT's lines and generate the rest (without it an existing OUTPUT is refused)",
    )
    p.add_argument(
        "--nats-url",
        help="use the actors and rewarders on this bus (default: start an embedded one)",
    )
    p.add_argument("--job", help="the job's name (default: derived from OUTPUT and settings)")
    p.add_argument("--window", type=_positive(int), default=64, help="tasks in flight at most")
    p.add_argument("--actors", type=_positive(int), default=1, help="embedded actors")
    p.add_argument("--rewarders", type=_positive(int), default=1, help="embedded rewarders")
    p.add_argument("--engine", choices=["vllm", "hf"], help="embedded actors' engine")

    def run(args):
        from pipeline.generate import main

        return main(args)

    p.set_defaults(func=run)


@command("config", "print the resolved config of a part (file, environment and --set) as TOML")
def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show"], help="show: print it")
    p.add_argument("part", help="its section: learner, actor, rewarder, up, bus")
    p.add_argument("--config", help="config file (TOML or YAML)")

    def run(args):
        from protocol.config import show_config

        print(show_config(args.part, args.config, args.set), end="")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aha", description="R1-style reasoning RL as an async actor-learner system on NATS"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, add_arguments in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        if any("--config" in action.option_strings for action in p._actions):
            _add_set(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from protocol.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # bad input: one line, before any long work (argparse's exit code)
        print(f"aha {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
