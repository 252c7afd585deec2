"""`aha distill`: every input checked before the teacher loads, one line naming the flag."""

from __future__ import annotations

import json

import pytest

from deploy.cli import main as aha


@pytest.fixture
def inputs(tmp_path):
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Q:1+1=", "answer": "2"}) + "\n")
    return tmp_path


def distill(folder, *extra: str) -> list[str]:
    args = ["distill", "--teacher", str(folder / "teacher"), "--student", str(folder / "student")]
    return [*args, "--prompts", str(folder / "prompts.jsonl"), "-o", str(folder / "out"), *extra]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: (f / "teacher" / "config.json").unlink(), "--teacher: no model at"),
        (lambda f: (f / "student" / "config.json").unlink(), "--student: no model at"),
        (lambda f: (f / "prompts.jsonl").unlink(), "--prompts: no such file"),
        (lambda f: (f / "prompts.jsonl").write_text('{"prompt": "Q:1+1="}\n'), "answer: missing"),
        (lambda f: (f / "out" / "model").mkdir(parents=True), "a distilled model is there"),
    ],
)
def test_bad_input_stops_before_the_teacher_loads(inputs, capsys, change, expected):
    change(inputs)
    assert aha(distill(inputs, "--local")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aha distill: error: ") and expected in err
    assert len(err.splitlines()) == 1
    assert not (inputs / "out" / "samples.jsonl").exists()


def test_a_bad_setting_is_refused_naming_its_flag(inputs, capsys):
    with pytest.raises(SystemExit) as exit:
        aha(distill(inputs, "--temperature", "-1"))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "argument --temperature: must be a finite number at least 0, got '-1'" in err
    assert not (inputs / "out").exists()
