"""The shipped benchmarks (pipeline/benchmarks.py and the files in pipeline/data/)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.benchmarks import BENCHMARKS, DATA, get_benchmark
from pipeline.prompts import R1_ZERO
from protocol.config import ConfigError
from rewarder.rewards import grade

ROOT = Path(__file__).parents[3]


def test_every_benchmark_loads_with_its_row_count_and_unique_ids():
    counts = {name: len(bench.problems()) for name, bench in BENCHMARKS.items()}
    # wc -l on the files as shipped
    assert counts == {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40, "humaneval": 164}
    for bench in BENCHMARKS.values():
        problems = bench.problems()
        assert len({p.id for p in problems}) == len(problems), bench.name
        for p in problems:
            bench.check_reference(p.reference)
    assert BENCHMARKS["math500"].problems()[0].id == "test/precalculus/807.json"
    assert BENCHMARKS["humaneval"].problems()[0].id == "HumanEval/0"


def test_each_benchmark_is_scored_by_its_own_rewards():
    rewards = {name: bench.rewards for name, bench in BENCHMARKS.items()}
    assert rewards == {
        "gsm8k": {"accuracy_gsm8k": 1.0},
        "math500": {"accuracy_math": 1.0},
        # competition answers are LaTeX/number answers: Math-Verify, not GSM8K's last number
        "aime24": {"accuracy_math": 1.0},
        "amc23": {"accuracy_math": 1.0},
        "humaneval": {"code_tests": 1.0},
    }
    # every AIME/AMC reference, boxed, is right against itself (AIME's `025` and AMC's
    # `27.0` included) and wrong against the next problem's
    math = {"accuracy_math": 1.0}
    for name in ("aime24", "amc23"):
        problems = BENCHMARKS[name].problems()
        for p, other in zip(problems, problems[1:] + problems[:1], strict=True):
            assert grade(rf"\boxed{{{p.reference}}}", p.reference, math).reward == 1.0, p.id
            if other.reference != p.reference:
                assert grade(rf"\boxed{{{other.reference}}}", p.reference, math).reward == 0.0
    assert BENCHMARKS["amc23"].problems()[0].reference == "27"
    reference = BENCHMARKS["humaneval"].problems()[32].reference
    assert set(reference) == {"entry_point", "test", "prompt"} and "def poly" in reference["prompt"]


def test_prompts_are_the_learners_r1_zero_rendering():
    for bench in BENCHMARKS.values():
        problem = bench.problems()[0]
        assert bench.prompt(problem) == R1_ZERO.format(prompt=problem.text)
    humaneval = BENCHMARKS["humaneval"]
    problem = humaneval.problems()[0]
    assert "def has_close_elements" in humaneval.prompt(problem)
    assert "```python" in problem.text


def test_the_registry_imports_without_torch():
    code = (
        "import sys; from pipeline.benchmarks import BENCHMARKS; "
        "b = BENCHMARKS['gsm8k']; b.prompt(b.problems()[0]); "
        "import pipeline.evaluation; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_package_ships_every_benchmark_file():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["pipeline"]
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch("pipeline", p) for p in packages)
    shipped = [f"data/{b.file}" for b in BENCHMARKS.values()] + ["data/README.md"]
    for name in shipped:
        assert (DATA.parent / name).is_file(), name
        assert any(fnmatch.fnmatch(name, g) for g in globs), name
    readme = (DATA / "README.md").read_text()
    for bench in BENCHMARKS.values():
        assert bench.file in readme  # its provenance


def test_an_unknown_benchmark_names_the_known_ones():
    with pytest.raises(ConfigError, match="no benchmark 'aime25'; known: gsm8k, math500"):
        get_benchmark("aime25")
