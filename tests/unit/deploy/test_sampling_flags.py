"""Sampling flags out of `Sampling`'s range (temperature >= 0, 0 < top-p <= 1) are refused by
`aha` at the start, naming the flag, on every command that takes them: argparse's error and
exit code 2, not a validation error from deep inside once the work has begun."""

from __future__ import annotations

import pytest

from deploy.cli import build_parser, main

BAD = [
    ("--temperature", "-1", "must be a finite number at least 0, got '-1'"),
    ("--temperature", "nan", "must be a finite number at least 0, got 'nan'"),
    ("--temperature", "inf", "must be a finite number at least 0, got 'inf'"),
    ("--temperature", "warm", "invalid float value: 'warm'"),
    ("--top-p", "0", "must be above 0 and at most 1, got '0'"),
    ("--top-p", "1.5", "must be above 0 and at most 1, got '1.5'"),
    ("--top-p", "nan", "must be above 0 and at most 1, got 'nan'"),
    ("--top-p", "-0.5", "must be above 0 and at most 1, got '-0.5'"),
]


def commands(tmp_path) -> dict[str, list[str]]:
    """Each command that takes sampling flags, with what else it needs."""
    model, prompts, out = str(tmp_path / "model"), str(tmp_path / "p.jsonl"), str(tmp_path / "o")
    return {
        "eval": ["eval", "--model", model, "--bench", "gsm8k", "-o", out],
        "generate": ["generate", "--model", model, "--prompts", prompts, "-o", out]
        + ["--rewards", "accuracy_gsm8k"],
        "rs": ["rs", "--model", model, "--prompts", prompts, "-o", out],
        "distill": ["distill", "--teacher", model, "--student", model, "--prompts", prompts]
        + ["-o", out],
    }


FLAGS = {
    "eval": ("--temperature", "--top-p"),
    "generate": ("--temperature", "--top-p"),
    "rs": ("--temperature", "--top-p"),
    "distill": ("--temperature",),
}
"""The sampling flags of each command (`grep -- --temperature deploy/cli.py`)."""


@pytest.mark.parametrize(
    ("command", "flag", "value", "error"),
    [(command, *bad) for command, flags in FLAGS.items() for bad in BAD if bad[0] in flags],
)
def test_a_bad_sampling_flag_is_refused_at_start_naming_it(
    command, flag, value, error, tmp_path, capsys
):
    argv = commands(tmp_path)[command]
    with pytest.raises(SystemExit) as exit:
        main([*argv, flag, value])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"aha {command}: error: argument {flag}: {error}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [c for c, flags in FLAGS.items() if "--top-p" in flags])
def test_the_edges_of_the_range_are_accepted(command, tmp_path):
    argv = commands(tmp_path)[command]
    args = build_parser().parse_args([*argv, "--temperature", "0", "--top-p", "1"])
    assert (args.temperature, args.top_p) == (0.0, 1.0)
    args = build_parser().parse_args([*argv, "--temperature", "2.5", "--top-p", "1e-3"])
    assert (args.temperature, args.top_p) == (2.5, 0.001)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--temperature", "0.35"], "--temperature"),
        (["--top-p", "0.8"], "--top-p"),
        (["--k", "8", "--temperature", "0.6"], "--k, --temperature"),
    ],
)
def test_eval_greedy_refuses_a_sampling_flag_it_would_override(flags, named, tmp_path, capsys):
    """`--greedy` is one sample at temperature 0: a --k, --temperature or --top-p beside it
    would be ignored, so it is refused (even at R1's values), before anything starts."""
    argv = commands(tmp_path)["eval"]
    assert main([*argv, "--greedy", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"aha eval: error: --greedy is one sample at temperature 0: drop {named}"
    assert not (tmp_path / "o").exists()
