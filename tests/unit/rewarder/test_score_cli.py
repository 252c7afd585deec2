"""`aha score IN.jsonl -o OUT.jsonl`, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.cli import main

ROOT = Path(__file__).parents[3]


def aha(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, as a user runs it."""
    argv = [sys.executable, "-m", "deploy.cli", *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2 and one line `aha score: error: ...` naming each of `named`; no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aha score: error: "), result.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_aha_score_adds_reward_components_and_error_in_input_order(tmp_path):
    rows = [
        {
            "id": "a",
            "completion": r"<think>1+1</think> \boxed{2}",
            "reference": "2",
            "rewards": {"accuracy_math": 1.0, "format_think": 0.1},
        },
        {
            "id": "b",
            "completion": "#### 1,000",
            "reference": "Sum ... #### 1000",
            "rewards": {"accuracy_gsm8k": 1.0},
        },
        {"id": "c", "completion": r"\boxed{3}", "reference": "", "rewards": {"accuracy_math": 1.0}},
        {
            "id": "d",
            "completion": "<think>二加二</think> 4",
            "reference": None,
            "rewards": {"language_consistency": 1.0},
            "meta": {"language": "zh"},
        },
        {
            "id": "e",
            "completion": "print(input()[::-1])",
            "reference": {"inputs": ["abc"], "outputs": ["cba"]},
            "rewards": {"code_tests": 2.0},
        },
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert (
        main(
            [
                "score",
                str(tmp_path / "in.jsonl"),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c", "d", "e"]  # input order, extra fields kept
    # a: 1.0*1 + 0.1*1 = 1.1
    assert out[0]["reward"] == 1.1 and out[0]["components"] == {
        "accuracy_math": 1.0,
        "format_think": 1.0,
    }
    assert out[0]["error"] is None
    assert out[1]["reward"] == 1.0
    # c: the reference does not parse: no reward, the reason, never 0
    assert out[2]["reward"] is None and out[2]["error"].startswith("accuracy_math: could not parse")
    assert out[2]["components"] == {"accuracy_math": None}
    # d: all three thought characters are Han
    assert out[3]["reward"] == 1.0 and out[3]["meta"] == {"language": "zh"}
    # e: 2.0 * 1 case of 1 passed
    assert out[4]["reward"] == 2.0


def test_aha_score_rejects_a_bad_line_before_scoring(tmp_path, capsys):
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"completion": "x", "reference": "1", "rewards": {"accuracy_math": 1.0}},
            {"completion": "x", "reference": "1", "rewards": {"acuracy": 1.0}},
        ],
    )
    assert main(["score", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("aha score: error: unknown reward(s) ['acuracy']")
    assert error.strip().endswith("in.jsonl:2)")
    assert not (tmp_path / "out.jsonl").exists()


def test_aha_score_help_is_instant():
    # the parser must not import the rewarder (sympy, math_verify) to print help
    code = "import sys; from deploy.cli import main\ntry:\n    main(['score', '--help'])\nexcept SystemExit:\n    pass\nprint('math_verify' in sys.modules, 'rewarder.pool' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("False False")


GOOD = {"completion": r"\boxed{2}", "reference": "2", "rewards": {"accuracy_math": 1.0}}


@pytest.mark.parametrize(
    "lines, reason",
    [
        ([b'{"completion": "\xff"}'], "not UTF-8: byte 0xff"),
        ([b"[" * 100_000 + b"]" * 100_000], "nested too deeply"),
        (
            [b'{"completion": "x", "rewards": {"accuracy_math": 1.0}}'],
            'no "reference" for accuracy_math to compare with',
        ),
        (
            [b'{"completion": "x", "reference": null, "rewards": {"accuracy_gsm8k": 1.0}}'],
            'no "reference" for accuracy_gsm8k to compare with',
        ),
        (
            [b'{"completion": "x", "reference": "1", "rewards": {"accuracy_math": NaN}}'],
            "NaN is not JSON",
        ),
        (
            [b'{"completion": "x", "reference": "1", "rewards": {"accuracy_math": -Infinity}}'],
            "-Infinity is not JSON",
        ),
        (
            [b'{"completion": "x", "reference": "1", "rewards": {"accuracy_math": 1e999}}'],
            "rewards.accuracy_math: inf is not a finite number",
        ),
        (
            [b'{"completion": "x", "reference": "1", "rewards": {"accuracy_math": 1}}', b"[1]"],
            "expected a JSON object, got list",
        ),
    ],
)
def test_a_bad_input_line_is_one_error_line_naming_it(tmp_path, lines, reason):
    # the last line is the bad one: nothing is scored (never against the string "None")
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"\n".join(lines) + b"\n")
    result = aha("score", path, "-o", tmp_path / "out.jsonl")
    message = assert_one_error_line(result, reason, f"({path}:{len(lines) + 1})")
    assert message == f"aha score: error: {reason} ({path}:{len(lines) + 1})"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_missing_input_or_an_output_that_cannot_be_written_fails_before_scoring(tmp_path):
    good = tmp_path / "in.jsonl"
    write_jsonl(good, [GOOD])
    missing = tmp_path / "missing.jsonl"
    assert_one_error_line(
        aha("score", missing, "-o", tmp_path / "out.jsonl"),
        f"cannot read: No such file or directory ({missing})",
    )
    assert_one_error_line(
        aha("score", good, "-o", tmp_path / "no" / "out.jsonl"),
        f"no such directory for the output ({tmp_path / 'no'})",
    )
    # -o naming a directory: refused up front, and nothing is left beside it
    (tmp_path / "folder").mkdir()
    assert_one_error_line(
        aha("score", good, "-o", tmp_path / "folder"),
        f"the output is a directory ({tmp_path / 'folder'})",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.jsonl"]
    result = aha("score", good, "-o", tmp_path / "out.jsonl", "--workers", "0")
    assert result.returncode == 2  # argparse's usage, then its one error line
    assert result.stderr.strip().splitlines()[-1] == (
        "aha score: error: argument --workers: must be a finite number above 0, got '0'"
    )


def test_a_read_only_output_directory_fails_before_scoring(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", [GOOD])
    argv = [
        sys.executable,
        "-m",
        "deploy.cli",
        "score",
        str(folder / "in.jsonl"),
        "-o",
        str(folder / "out.jsonl"),
    ]
    if os.getuid() != 0:
        folder.chmod(0o555)
    else:  # root writes through permission bits: a read-only mount instead
        script = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", *argv]
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("root without mount namespaces: no read-only folder to write to")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    folder.chmod(0o755)
    reason = "Permission denied" if os.getuid() != 0 else "Read-only file system"
    assert_one_error_line(result, f"cannot write the output: {reason} ({folder / 'out.jsonl'})")


def test_an_existing_output_is_refused_without_resume(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [GOOD])
    (tmp_path / "out.jsonl").write_text("earlier work\n")
    result = aha("score", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl")
    assert_one_error_line(
        result, "the output exists; --resume continues it", f"({tmp_path / 'out.jsonl'})"
    )
    assert (tmp_path / "out.jsonl").read_text() == "earlier work\n"  # untouched
    # --resume checks the lines there belong to this input before keeping them
    result = aha("score", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--resume")
    assert_one_error_line(result, f"not a line aha score wrote ({tmp_path / 'out.jsonl'}:1)")
    other = {**GOOD, "completion": "other", "reward": 0}
    (tmp_path / "out.jsonl").write_text(json.dumps(other) + "\n")
    result = aha("score", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--resume")
    assert_one_error_line(result, f"not the output of input line 1 ({tmp_path / 'out.jsonl'}:1)")


def test_a_killed_run_keeps_its_lines_and_resume_scores_only_the_rest(tmp_path):
    n = 150
    rows = [{"id": i, **GOOD, "completion": rf"\boxed{{{i % 3}}}"} for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = [
        sys.executable,
        "-m",
        "deploy.cli",
        "score",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(out),
        "--workers",
        "1",
    ]
    run = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    written = out.read_bytes()
    kept = written.count(b"\n")
    assert 5 <= kept < n, "the run was killed midway, with some lines written and some not"
    # each line written is whole and final: a killed run loses none of them
    assert [json.loads(line)["id"] for line in written.splitlines()] == list(range(kept))
    with open(out, "ab") as f:  # as if killed in the middle of writing a long line
        f.write(b'{"id": ')

    result = aha("score", tmp_path / "in.jsonl", "-o", out, "--resume", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"{kept} kept from the interrupted run" in result.stderr
    assert out.read_bytes().startswith(written)  # the earlier lines as they were
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["id"] for o in scored] == list(range(n))  # the half line scored again, once
    assert all(o["reward"] == (1.0 if o["id"] % 3 == 2 else 0.0) for o in scored)
