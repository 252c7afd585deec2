"""`aha score IN.jsonl -o OUT.jsonl`, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from deploy.cli import main


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
    assert "in.jsonl:2: unknown reward(s) ['acuracy']" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_aha_score_help_is_instant():
    # the parser must not import the rewarder (sympy, math_verify) to print help
    code = "import sys; from deploy.cli import main\ntry:\n    main(['score', '--help'])\nexcept SystemExit:\n    pass\nprint('math_verify' in sys.modules, 'rewarder.pool' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("False False")
