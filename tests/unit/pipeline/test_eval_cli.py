"""`aha eval --samples-from FILE --bench NAME -o DIR`, through the real command, on samples
built from real benchmark rows; the summary's numbers are worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from pipeline.benchmarks import BENCHMARKS

ROOT = Path(__file__).parents[3]
STALL = r"\boxed{\prod_{k=1}^{3000} (1 + \frac{1}{k^2})}"
"""An answer that keeps sympy busy for minutes: the verifier's budget makes it a 0."""


def aha(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, as a user runs it."""
    argv = [sys.executable, "-m", "deploy.cli", *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample(text: str, n_tokens: int, finish_reason: str = "stop") -> dict:
    return {"text": text, "n_tokens": n_tokens, "finish_reason": finish_reason}


def math500_samples() -> list[dict]:
    """Three MATH-500 problems, four samples each."""
    rows = {p.id: p for p in BENCHMARKS["math500"].problems()}
    polar = rows["test/precalculus/807.json"]  # answer \left( 3, \frac{\pi}{2} \right)
    sum_ = next(p for p in rows.values() if p.reference == r"\frac{14}{3}")
    solution = {  # the reference solutions, whose last \boxed{} is the answer
        json.loads(line)["unique_id"]: json.loads(line)["solution"]
        for line in (BENCHMARKS["math500"].path).read_text().splitlines()
    }
    divisors = next(p for p in rows.values() if p.reference == "9")
    return [
        {  # 2 right of 4; votes: right ×2, 5 ×1, no answer (truncated) ×1
            "id": polar.id,
            "bench": "math500",
            "reference": polar.reference,
            "samples": [
                sample(f"<think>Wait, r = 3.</think> {solution[polar.id]}", 100),
                sample(solution[polar.id], 100),
                sample(r"<think>guess</think> \boxed{5}", 5),
                sample("<think>r = \\sqrt{0^2 + 3^2}, and then", 512, "length"),
            ],
        },
        {  # 1 right of 4; votes: 0.5 and \frac12 are one wrong answer ×2, right ×1, stall ×1
            "id": sum_.id,
            "reference": sum_.reference,
            "samples": [
                sample(r"\boxed{0.5}", 6),
                sample(r"\boxed{\frac12}", 8),
                sample(solution[sum_.id], 90),
                sample(STALL, 40),
            ],
        },
        {  # a reference no verifier can read: all four undecided
            "id": divisors.id,
            "reference": "",
            "samples": [
                sample(solution[divisors.id], 90),
                sample(solution[divisors.id], 90),
                sample(r"\boxed{1}", 3),
                sample(r"\boxed{2}", 3),
            ],
        },
    ]


def test_eval_samples_from_math500_gives_the_hand_worked_summary(tmp_path):
    src = write_jsonl(tmp_path / "samples.jsonl", math500_samples())
    # a 6 s timeout: Math-Verify gets 2 s of it, so the stall is a 0 in time, not a null
    result = aha(
        "eval",
        "--samples-from",
        src,
        "--bench",
        "math500",
        "-o",
        tmp_path / "out",
        "--timeout",
        6,
        "--json",
        "--reflection-words",
        "wait, recheck",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    s = summary["math500"]
    assert (s["problems"], s["k"], s["samples"]) == (3, 4, 12)
    # per problem c/n = 2/4, 1/4, 0/4 (undecided is not right): mean 1/4; sample sd of
    # (0.5, 0.25, 0) is 0.25, standard error 0.25/sqrt(3)
    assert s["pass_at_1"] == pytest.approx(0.25)
    assert s["pass_at_1_stderr"] == pytest.approx(0.25 / math.sqrt(3))
    # pass@2 = mean(1 - C(2,2)/C(4,2), 1 - C(3,2)/C(4,2), 0) = (5/6 + 1/2 + 0)/3 = 4/9
    # pass@4 = (1 + 1 + 0)/3
    assert s["pass_at_k"] == pytest.approx({"1": 0.25, "2": 4 / 9, "4": 2 / 3})
    # cons@4: problem 1 right (2 votes against 1), problem 2 wrong (0.5 = \frac12: 2 votes
    # against 1 and 1), problem 3 wrong (undecided). cons@2: problem 1 5/6 (only the pair
    # {5, no answer} loses; ties go to the right answer, given first), problem 2 1/6 (only
    # {right, stall} wins: a 1-1 tie to the right answer, given before the stall)
    assert s["cons_at_k"] == pytest.approx({"1": 0.25, "2": (5 / 6 + 1 / 6) / 3, "4": 1 / 3})
    assert s["undecided"] == pytest.approx(4 / 12)
    assert s["truncated"] == pytest.approx(1 / 12)
    assert s["unrewarded"] == pytest.approx(5 / 12)  # 5, truncated, 0.5, \frac12, stall
    assert s["no_answer"] == pytest.approx(1 / 12)
    # tokens 100 100 5 512 | 6 8 90 40 | 90 90 3 3: mean 1047/12, median (40 + 90)/2
    assert (s["mean_length"], s["median_length"], s["length_unit"]) == (
        pytest.approx(1047 / 12),
        65,
        "tokens",
    )
    assert s["reflection_share"] == pytest.approx(1 / 12)  # "Wait" inside the first thought
    assert s["settings"]["rewards"] == {"accuracy_math": 1.0}
    assert s["settings"]["reflection_words"] == ["wait", "recheck"]
    # the table, and the per-sample results
    assert "pass@1" in result.stdout and "cons@4" in result.stdout
    scored = [
        json.loads(line) for line in (tmp_path / "out" / "scored.jsonl").read_text().splitlines()
    ]
    assert len(scored) == 12
    assert [r["vote"] for r in scored] == [0, 0, 1, None, 0, 0, 1, 2, 0, 0, 1, 2]
    assert scored[4]["answer"] == "0.5" and scored[5]["answer"] == r"\frac12"
    stall = scored[7]
    assert (stall["reward"], stall["error"]) == (0.0, None)
    assert "timed out" in stall["note"]
    assert all(r["reward"] is None and "reference" in r["error"] for r in scored[8:])
    assert [r["correct"] for r in scored[:4]] == [True, True, False, False]


def test_eval_scores_humaneval_canonical_solutions_right_and_empty_bodies_wrong(tmp_path):
    problems = BENCHMARKS["humaneval"].problems()[:3]
    rows = {
        json.loads(line)["task_id"]: json.loads(line)
        for line in BENCHMARKS["humaneval"].path.read_text().splitlines()
    }
    lines = [
        {
            "id": p.id,
            "reference": p.reference,
            "samples": [
                {
                    "text": f"<think>ok</think>\n```python\n{p.reference['prompt']}"
                    f"{rows[p.id]['canonical_solution']}```"
                },
                {"text": f"```python\n{p.reference['prompt']}    return None\n```"},
            ],
        }
        for p in problems
    ]
    src = write_jsonl(tmp_path / "samples.jsonl", lines)
    out = tmp_path / "out"
    assert main(["eval", "--samples-from", str(src), "--bench", "humaneval", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["humaneval"]
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 0.0] * 3, [r["error"] for r in scored]
    assert s["pass_at_1"] == 0.5 and s["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert s["cons_at_k"] is None  # programs do not vote
    assert s["length_unit"] == "characters"


def error_line(capsys, argv: list[str]) -> str:
    """Run `aha eval` in-process; assert exit 2 and one error line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aha eval: error: "), err
    return err[0]


def test_bad_input_is_one_line_naming_the_file_line_and_field(tmp_path, capsys):
    good = {"id": 1, "reference": "2", "samples": [{"text": r"\boxed{2}"}]}
    out = str(tmp_path / "out")

    def run(lines: list[dict], *extra: str, bench: str = "math500") -> str:
        src = write_jsonl(tmp_path / "s.jsonl", lines)
        return error_line(
            capsys, ["eval", "--samples-from", str(src), "--bench", bench, "-o", out, *extra]
        )

    assert "no benchmark 'aime25'" in run([good], bench="aime25")
    line = run([good, {"id": 2, "samples": [{"text": "x"}]}])
    assert "reference: Field required" in line and "s.jsonl:2" in line
    line = run([good, {"id": 2, "reference": "1", "samples": [{"txt": "x"}]}])
    assert "samples.0.text: Field required" in line and "s.jsonl:2" in line
    line = run([good, {**good, "samples": []}])
    assert "samples: List should have at least 1 item" in line
    line = run([good, good])
    assert "id: '1' is also on line 1" in line and "s.jsonl:2" in line
    two = {**good, "id": 2, "samples": [{"text": "1"}, {"text": "2"}]}
    assert "1 samples where line 1 has 2" in run([two, good])
    assert "fewer than --k 2" in run([two, good], "--k", "2")
    line = run([good, {**good, "id": 2, "bench": "gsm8k"}])
    assert "bench: 'gsm8k', but --bench is 'math500'" in line and "s.jsonl:2" in line
    line = run([good], bench="humaneval")
    assert "reference: code_tests needs an object" in line and "s.jsonl:1" in line
    src = tmp_path / "nan.jsonl"
    src.write_text('{"id": 1, "reference": "2", "samples": [{"text": "x", "reward": NaN}]}\n')
    assert "nan.jsonl:1" in error_line(
        capsys, ["eval", "--samples-from", str(src), "--bench", "math500", "-o", out]
    )
    assert "cannot read" in run([good], "--samples-from", str(tmp_path / "missing.jsonl"))
    # results already there are never overwritten
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    assert "summary.json exists" in run([good])
    assert (tmp_path / "out" / "summary.json").read_text() == "{}"
    # k below 1: argparse's own error line, exit 2
    result = aha("eval", "--samples-from", "s.jsonl", "--bench", "math500", "-o", out, "--k", "0")
    assert result.returncode == 2 and "--k" in result.stderr
