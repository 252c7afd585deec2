"""`aha eval --samples-from` on each shipped benchmark's own reference solutions: all right
(issue 11, "Done when"). HumanEval's 164 canonical solutions all go through the same pool in
tests/unit/rewarder/test_reference_data.py; here every eighth, with its `return None` body."""

from __future__ import annotations

import json

import pytest

from deploy.cli import main
from pipeline.benchmarks import BENCHMARKS


def reference_samples(name: str) -> list[dict]:
    """A samples line per problem whose samples are the benchmark's own answers: GSM8K's and
    MATH-500's worked solutions, AIME's and AMC's answers boxed (their `solution` texts are
    forum posts), HumanEval's canonical solution and an empty body."""
    bench = BENCHMARKS[name]
    rows = [json.loads(line) for line in bench.path.read_text().splitlines()]
    lines = []
    for problem, row in zip(bench.problems(), rows, strict=True):
        if name == "gsm8k":
            texts = [row["answer"]]
        elif name == "math500":
            texts = [row["solution"]]
        elif name == "humaneval":
            code = f"```python\n{row['prompt']}"
            texts = [f"{code}{row['canonical_solution']}```", f"{code}    return None\n```"]
        else:
            texts = [rf"\boxed{{{problem.reference}}}"]
        lines.append(
            {
                "id": problem.id,
                "reference": problem.reference,
                "samples": [{"text": t} for t in texts],
            }
        )
    return lines[::8] if name == "humaneval" else lines


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_reference_solutions_score_right(name, tmp_path):
    lines = reference_samples(name)
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "--samples-from", str(src), "--bench", name, "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())[name]
    scored = [json.loads(x) for x in (tmp_path / "out" / "scored.jsonl").read_text().splitlines()]
    assert s["problems"] == len(lines) == {"humaneval": 21}.get(name, BENCHMARKS[name].rows)
    if name == "humaneval":
        # the canonical solution right, the empty body wrong, on every problem
        assert [r["reward"] for r in scored] == [1.0, 0.0] * len(lines)
        assert s["pass_at_k"] == {"1": 0.5, "2": 1.0}
    else:
        wrong = [(r["id"], r["answer"], r["error"]) for r in scored if r["reward"] != 1.0]
        assert wrong == []
        assert s["pass_at_1"] == 1.0 and s["cons_at_k"] == {"1": 1.0}
