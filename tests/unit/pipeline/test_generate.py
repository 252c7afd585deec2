"""`aha generate` / `aha eval --model`: bad input is one line naming the file, line and field,
before any server, actor or model starts; the plan's task ids and chunks; resume's reading of
a file a killed run left."""

from __future__ import annotations

import json
import time

import pytest

from deploy.cli import main as aha
from pipeline.generate import Plan
from protocol.config import ConfigError
from protocol.messages import Sampling


@pytest.fixture(autouse=True)
def _logging():
    """`aha generate` sets up logging on the test's (captured, then closed) streams."""
    import structlog

    yield
    structlog.reset_defaults()


PROBLEMS = [{"id": str(i), "prompt": f"Q:{i}+1=", "reference": str(i + 1)} for i in range(3)]


def plan(tmp_path, k=2, **kw) -> Plan:
    args = dict(meta=None, job=None, group_limit=16)
    args.update(kw)
    return Plan.of(
        str(tmp_path / "model"),
        PROBLEMS,
        k,
        Sampling(seed=7),
        {"accuracy_gsm8k": 1.0},
        tmp_path / "s.jsonl",
        local=False,
        **{"meta": args["meta"], "job": args["job"], "group_limit": args["group_limit"]},
    )


def refused(capsys, argv: list[str]) -> str:
    started = time.monotonic()
    assert aha(argv) == 2
    assert time.monotonic() - started < 5  # nothing long started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_before_anything_starts(tmp_path, capsys, tiny_model_dir):
    model = str(tiny_model_dir)
    out = str(tmp_path / "out.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Q:1+1=", "answer": "2"}\n{"question": "Q:2+2="}\n')
    base = ["generate", "--model", model, "--rewards", "accuracy_gsm8k", "-o", out]

    err = refused(capsys, [*base, "--prompts", str(prompts)])
    assert err.endswith(f"prompt: missing ({prompts}:2)")

    prompts.write_text('{"prompt": "Q:1+1=", "answer": "2"}\n')
    assert "--k: 0, must be at least 1" in refused(
        capsys, [*base, "--prompts", str(prompts), "--k", "0"]
    )
    err = refused(capsys, [*base, "--prompts", str(prompts), "--job", "train.>"])
    assert "--job: job name 'train.>'" in err
    err = refused(
        capsys, [*base[:-4], "--rewards", "accuracy_nope", "-o", out, "--prompts", str(prompts)]
    )
    assert "--rewards: unknown ['accuracy_nope']" in err
    err = refused(
        capsys,
        [
            "generate",
            "--model",
            str(tmp_path),
            "--prompts",
            str(prompts),
            "--rewards",
            "accuracy_gsm8k",
            "-o",
            out,
        ],
    )
    assert "--model: no config.json" in err

    (tmp_path / "out.jsonl").write_text("")
    assert "exists; --resume continues it" in refused(capsys, [*base, "--prompts", str(prompts)])

    err = refused(
        capsys, ["eval", "--model", model, "--bench", "gsm8k,nope", "-o", str(tmp_path / "e")]
    )
    assert "--bench: no benchmark 'nope'" in err


def test_a_plan_names_its_tasks_and_splits_k_into_chunks(tmp_path):
    p = plan(tmp_path, k=40)
    assert p.chunks == [14, 13, 13]  # k above the group limit: as even as it goes
    task = p.task(2, 1, "/models/m")
    assert task.task_id == f"{p.job}-2-1" and p.position(task.task_id) == (2, 1)
    assert (task.job, task.model, task.group_size, task.prompt) == (
        p.job,
        "/models/m",
        13,
        "Q:2+1=",
    )
    assert p.task(2, 0, None).sampling.seed != task.sampling.seed  # each task its own seed
    assert p.task(2, 1, None).sampling.seed == task.sampling.seed  # and the same on a resume
    for foreign in ("x-2-1", f"{p.job}-3-0", f"{p.job}-0-3", f"{p.job}-a-0", f"{p.job}x-0-0"):
        assert p.position(foreign) is None
    # the job's name comes from the output and the settings: a resume finds the same one
    assert plan(tmp_path, k=40).job == p.job != plan(tmp_path, k=41).job


def test_resume_keeps_whole_lines_and_drops_a_half_written_one(tmp_path):
    p = plan(tmp_path, k=1)
    line = {"id": "2", "prompt": "Q:2+1=", "reference": "3", "samples": [{"text": "3"}]}
    p.out.write_text(json.dumps(line) + "\n" + '{"id": "0", "sam')
    assert p.check_output(resume=True) == {2}
    assert p.out.read_text() == json.dumps(line) + "\n"

    p.out.write_text(json.dumps({**line, "id": "9"}) + "\n")
    with pytest.raises(ConfigError, match="'9' is not one of the prompts"):
        p.check_output(resume=True)
    p.out.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match="repeated"):
        p.check_output(resume=True)
