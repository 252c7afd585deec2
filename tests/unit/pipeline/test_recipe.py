"""`aha pipeline`: the recipe is checked before any work, stages are recorded by fingerprint,
and `--resume` reruns exactly the stages whose settings or inputs changed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from deploy.cli import main as aha
from pipeline.recipe import hash_path
from pipeline.samples import ProblemSamples, Sample

GOOD = "<think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>"


def write_samples(path: Path, texts: list[str]) -> Path:
    samples = [Sample(text=t, reward=0.0 if "578" in t else 1.1) for t in texts]
    line = ProblemSamples(id="1", prompt="Q:123+456=", reference="579", samples=samples)
    path.write_text(line.model_dump_json() + "\n")
    return path


def two_rs_stages(tmp_path: Path, m: int = 2) -> Path:
    """rs-a filters samples.jsonl; rs-b filters it too and mixes in rs-a's output as its
    direct pairs (so it depends on rs-a)."""
    write_samples(
        tmp_path / "samples.jsonl",
        [GOOD, GOOD.replace("0=9", "0=9 "), "<think>x</think><answer>578</answer>", "579"],
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            [pipeline]
            name = "t"
            runs_dir = "{tmp_path / "runs"}"

            [[stages]]
            name = "rs-a"
            kind = "rs"
            samples = "samples.jsonl"
            filters = {{ max_per_prompt = {m} }}

            [[stages]]
            name = "rs-b"
            kind = "rs"
            samples = "samples.jsonl"
            direct = "@rs-a"
            filters = {{ max_per_prompt = 1, direct_share = 0.5 }}
            """
        )
    )
    return recipe


def run(capsys, *args) -> tuple[int, dict | str]:
    code = aha(["pipeline", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    if code:
        return code, err.strip()
    return code, json.loads(out.strip().splitlines()[-1])


def ran(summary: dict) -> list[str]:
    return [s["name"] for s in summary["stages"] if not s["skipped"]]


def test_stages_run_and_are_recorded(tmp_path, capsys):
    code, summary = run(capsys, two_rs_stages(tmp_path))
    assert code == 0 and ran(summary) == ["rs-a", "rs-b"]
    a, b = summary["stages"]
    # samples: 2 right (different texts), 1 wrong, 1 without a thought -> 2 kept by rs-a.
    assert a["result"]["kept"] == 2 and a["result"]["dropped"]["incorrect"] == 1
    # rs-b keeps 1 and mixes in 1 of rs-a's 2 lines: share 0.5.
    assert b["result"]["kept"] == 1 and b["result"]["direct"] == 1
    record = json.loads((tmp_path / "runs/t/stages/rs-a.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 1
    assert record["output_hash"] == hash_path(tmp_path / "runs/t/rs-a/rs.jsonl")
    assert record["inputs"]["samples"] == hash_path(tmp_path / "samples.jsonl")
    # rs-b's input from rs-a is rs-a's output, by the hash recorded when rs-a finished.
    b_record = json.loads((tmp_path / "runs/t/stages/rs-b.json").read_text())
    assert b_record["inputs"]["direct"] == record["output_hash"]


def test_resume_skips_what_is_done_and_unchanged(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    run(capsys, recipe)
    code, summary = run(capsys, recipe, "--resume")
    assert code == 0 and ran(summary) == []


def test_without_resume_an_existing_run_is_refused(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    run(capsys, recipe)
    code, err = run(capsys, recipe)
    assert code == 2 and "--resume continues it" in err


def test_a_changed_setting_reruns_that_stage_and_what_depends_on_its_output(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path, m=2)
    run(capsys, recipe)
    two_rs_stages(tmp_path, m=1)  # rs-a keeps 1 now: its output changes, so rs-b's input does
    code, summary = run(capsys, recipe, "--resume")
    assert ran(summary) == ["rs-a", "rs-b"]
    assert summary["stages"][0]["attempts"] == 2


def test_a_rerun_with_the_same_output_leaves_later_stages_alone(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path, m=2)
    run(capsys, recipe)
    (tmp_path / "runs/t/rs-a/rs.jsonl").write_text("")  # an output damaged after the run
    code, summary = run(capsys, recipe, "--resume")
    # rs-a runs again and writes what it wrote the first time: rs-b's inputs are unchanged.
    assert ran(summary) == ["rs-a"]


def test_a_changed_input_file_reruns_every_stage_that_reads_it(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    run(capsys, recipe)
    write_samples(tmp_path / "samples.jsonl", [GOOD])
    code, summary = run(capsys, recipe, "--resume")
    assert ran(summary) == ["rs-a", "rs-b"]


def test_a_stage_that_never_finished_runs_again(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    run(capsys, recipe)
    record_file = tmp_path / "runs/t/stages/rs-b.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "status": "running"}))  # as a killed run leaves it
    code, summary = run(capsys, recipe, "--resume")
    assert ran(summary) == ["rs-b"] and summary["stages"][1]["attempts"] == 2


RECIPE_ERRORS = [
    (
        '[pipeline]\nengine = "vllm"\n[pipeline.demo]\nhead_size = 16\n'
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "$run/demo/base"\ndata = ["d.jsonl"]\n',
        'pipeline.demo.head_size: heads of 16 need [pipeline] engine = "hf"',
    ),
    (
        "[pipeline.demo]\nstudent_hidden = 48\n"
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "$run/demo/base"\ndata = ["d.jsonl"]\n',
        "pipeline.demo.student_hidden: 48 is not a multiple of head_size 32",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "ppo"\nmodel = "m"\n',
        "stages.0 (a).kind: unknown stage kind 'ppo'; one of sft, grpo, rs, eval, distill",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "nowhere"\ndata = ["d.jsonl"]\n',
        "stages.0 (a).model: no model at",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "model"\ndata = ["missing.jsonl"]\n',
        "stages.0 (a).data.0: no such file:",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "model"\ndata = ["d.jsonl"]\nstep = 3\n',
        "stages.0 (a).step: Extra inputs are not permitted",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "sft"\ndata = ["d.jsonl"]\n',
        "stages.0 (a).model: Field required",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "grpo"\nmodel = "@b"\n'
        '[[stages]]\nname = "b"\nkind = "sft"\nmodel = "model"\ndata = ["d.jsonl"]\n',
        "stages.0 (a).model: '@b' refers to a later stage",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "grpo"\nmodel = "model"\nup = { actors = 2 }\n',
        "stages.0 (a).up.actors: the pipeline's one bus, actor and rewarder serve every stage",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "grpo"\nmodel = "model"\nparts = { actor = {} }\n',
        "stages.0 (a).parts.actor: the pipeline's one bus, actor and rewarder serve every stage",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "grpo"\nmodel = "model"\nup = { eval_samples = -1 }\n',
        "stages.0 (a).up.eval_samples: Input should be greater than or equal to 0",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "eval"\nsamples = "d.jsonl"\nbench = "nope"\n',
        "stages.0 (a).bench:",
    ),
    (
        '[[stages]]\nname = "a"\nkind = "rs"\nmodel = "model"\n',
        "stages.0 (a).prompts: required with model",
    ),
    ("[pipeline]\nname = 'x'\n", "stages: Field required"),
    (
        '[[stages]]\nname = "e"\nkind = "eval"\nsamples = "d.jsonl"\nbench = "gsm8k"\n'
        '[[stages]]\nname = "a"\nkind = "grpo"\nmodel = "@e"\n',
        "stages.1 (a).model: '@e' is the output of eval stage 'e': a file, not a model",
    ),
    (
        '[[stages]]\nname = "s"\nkind = "sft"\nmodel = "model"\ndata = ["d.jsonl"]\n'
        '[[stages]]\nname = "a"\nkind = "sft"\nmodel = "model"\ndata = ["@s"]\n',
        "stages.1 (a).data.0: '@s' is the output of sft stage 's': a model, not a file",
    ),
]


@pytest.mark.parametrize(("text", "expected"), RECIPE_ERRORS)
def test_a_bad_recipe_is_one_line_naming_the_file_and_the_stage_field(
    tmp_path, capsys, monkeypatch, text, expected
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    code, err = run(capsys, recipe)
    assert code == 2
    assert err.startswith("aha pipeline: error: ") and len(err.splitlines()) == 1
    assert expected in err and str(recipe) in err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_the_demo_recipe_is_valid():
    from pipeline.recipe import Run, demo_recipe, load_recipe

    recipe = load_recipe(demo_recipe())
    Run(recipe, demo_recipe()).check()
    kinds = [s.kind for s in recipe.stages]
    assert {"sft", "grpo", "rs", "eval", "distill"} == set(kinds)


def test_r1_findings_are_judged_on_pass_at_1():
    from pipeline.recipe import findings

    def model(pass_at_1, accuracy=0.9, length=30.0, thinking=1.0):
        keys = ("pass_at_1", "accuracy", "mean_length", "thinking_share")
        return dict(zip(keys, (pass_at_1, accuracy, length, thinking), strict=True))

    models = {
        "cold_start": model(0.20, 0.01, 8.0, 0.0),
        "rl": model(0.45, 0.94, 33.0, 1.0),
        "sft_rs": model(0.40),  # cold start + 0.2 exactly: kept
        "sft_unfiltered": model(0.31, accuracy=0.99),  # greedy above sft_rs: does not count
        "distilled": model(0.5, accuracy=0.1),
        "student_rl": model(0.5, accuracy=0.9),  # a tie in pass@1 is not a win
    }
    out = findings([{"kind": "eval", "result": models}])
    assert out["r1"] == {
        "rl_improves_reasoning": True,
        "sft_on_filtered_rs_keeps_the_gain": False,  # 0.09 above unfiltered, not 0.1
        "distillation_beats_rl_on_the_student": False,
    }
    models["sft_unfiltered"] = model(0.30, accuracy=0.99)
    models["distilled"] = model(0.51, accuracy=0.1)
    out = findings([{"kind": "eval", "result": models}])
    assert all(out["r1"].values())
    assert out["sft_unfiltered"]["pass_at_1"] == 0.30 and out["sft_unfiltered"]["accuracy"] == 0.99
    models["rl"] = model(0.45, 0.94, 33.0, 0.0)  # pass@1 up but no more thinking: not R1's story
    assert not findings([{"kind": "eval", "result": models}])["r1"]["rl_improves_reasoning"]
    models["student_rl"] = model(None)  # greedy only (k = 0): no verdict
    assert "r1" not in findings([{"kind": "eval", "result": models}])
    del models["student_rl"]  # an eval without every model: no verdict
    assert "r1" not in findings([{"kind": "eval", "result": models}])


def test_a_file_an_earlier_stage_did_not_write_is_named(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    text = recipe.read_text().replace('direct = "@rs-a"', 'direct = "@rs-a/nothing.jsonl"')
    recipe.write_text(text)
    code, err = run(capsys, recipe)
    assert code == 2 and "rs-b.direct: '@rs-a/nothing.jsonl' is not there" in err
    # rs-a's work is kept: resumed, only rs-b is tried again.
    recipe.write_text(text.replace("@rs-a/nothing.jsonl", "@rs-a/rs.jsonl"))
    code, summary = run(capsys, recipe, "--resume")
    assert code == 0 and ran(summary) == ["rs-b"]


def test_a_stage_that_fails_is_recorded_and_reported_in_one_line(tmp_path, capsys):
    recipe = two_rs_stages(tmp_path)
    line = json.loads((tmp_path / "samples.jsonl").read_text())
    del line["prompt"]  # rs needs the prompt of every line
    (tmp_path / "samples.jsonl").write_text(json.dumps(line) + "\n")
    code, err = run(capsys, recipe)
    err = err.splitlines()[-1]  # after the stage's log line
    assert code == 2 and err.startswith("aha pipeline: error: rs-a: prompt: required by rs")
    record = json.loads((tmp_path / "runs/t/stages/rs-a.json").read_text())
    assert record["status"] == "failed" and "prompt" in record["error"]
    assert not (tmp_path / "runs/t/stages/rs-b.json").exists()


def test_a_stage_command_that_fails_names_its_log(tmp_path, capsys):
    (tmp_path / "samples.jsonl").write_text('{"id": "1", "reference": "#### 5", "samples": []}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[pipeline]\nname = "t"\nruns_dir = "{tmp_path / "runs"}"\n'
        '[[stages]]\nname = "e"\nkind = "eval"\nsamples = "samples.jsonl"\nbench = "gsm8k"\n'
    )
    code, err = run(capsys, recipe)
    err = err.splitlines()[-1]  # after the stage's log line
    assert code == 1
    assert err.startswith("aha pipeline: stage e (eval) failed: aha eval exited with 2:")
    assert "eval.log" in err
    assert json.loads((tmp_path / "runs/t/stages/e.json").read_text())["status"] == "failed"


PARALLEL_RECIPE = """
[pipeline]
name = "p"
parallel = {parallel}

[[stages]]
name = "cold"
kind = "sft"
model = "base"
data = ["pairs.jsonl"]

[[stages]]
name = "rl"
kind = "grpo"
model = "@cold"

[[stages]]
name = "student"
kind = "sft"
model = "base"
data = ["pairs.jsonl"]

[[stages]]
name = "rs"
kind = "rs"
model = "@rl"
prompts = "pairs.jsonl"

[[stages]]
name = "student-rl"
kind = "grpo"
model = "@student"

[[stages]]
name = "eval"
kind = "eval"
held_out = "pairs.jsonl"
models = {{ rl = "@rl", student = "@student/model" }}
"""


@pytest.mark.parametrize(
    ("parallel", "schedule"),
    [
        # One at a time: the file's order.
        (1, [["cold"], ["rl"], ["student"], ["rs"], ["student-rl"], ["eval"]]),
        # Two: the student's SFT beside the cold start; the two grpo stages and the
        # bus-sampled rs never together, and in the file's order; eval once both of its
        # models exist.
        (2, [["cold", "student"], ["rl"], ["rs", "eval"], ["student-rl"]]),
        (3, [["cold", "student"], ["rl"], ["rs", "eval"], ["student-rl"]]),
    ],
)
def test_stages_start_when_their_references_are_done_one_at_a_time_on_the_bus(
    tmp_path, parallel, schedule
):
    from pipeline.recipe import Run, load_recipe, startable

    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(PARALLEL_RECIPE.format(parallel=parallel))
    run = Run(load_recipe(recipe_file), recipe_file)
    pending, done, waves = list(run.recipe.stages), set(), []
    while pending:  # each wave: what starts, then all of it finishes
        wave = startable(run, pending, done, [], parallel)
        waves.append([s.name for s in wave])
        pending = [s for s in pending if s not in wave]
        done |= {s.name for s in wave}
    assert waves == schedule
    # With the bus busy (rl running), neither rs nor the other grpo stage starts.
    rest = [s for s in run.recipe.stages if s.name in ("rs", "student-rl", "eval")]
    busy = [run.stages["rl"]]
    names = [s.name for s in startable(run, rest, {"cold", "student", "rl"}, busy, 3)]
    assert names == ["eval"]
    # The student's grpo is ready before the cold start is done, and still waits: rl, earlier
    # in the file, would otherwise wait for it.
    rest = [s for s in run.recipe.stages if s.name not in ("cold", "student")]
    names = [s.name for s in startable(run, rest, {"student"}, [run.stages["cold"]], 3)]
    assert names == []


def eval_stage(tmp_path: Path, name: str, reference: str) -> str:
    samples = tmp_path / f"{name}.jsonl"
    line = {"id": "1", "reference": reference, "samples": [{"text": GOOD}] if reference else []}
    samples.write_text(json.dumps(line) + "\n")
    return (
        f'[[stages]]\nname = "{name}"\nkind = "eval"\nsamples = "{samples.name}"\nbench = "gsm8k"\n'
    )


def test_independent_stages_run_at_once_and_a_failure_lets_the_running_ones_finish(
    tmp_path, capsys
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[pipeline]\nname = "t"\nruns_dir = "{tmp_path / "runs"}"\nparallel = 2\n'
        + eval_stage(tmp_path, "bad", "")  # no samples: `aha eval` exits with 2
        + eval_stage(tmp_path, "good", "#### 579")
        + eval_stage(tmp_path, "after", "#### 579")  # would start when a slot frees
    )
    code, err = run(capsys, recipe)
    assert code == 1 and "stage bad (eval) failed" in err.splitlines()[-1]
    records = {
        name: json.loads((tmp_path / f"runs/t/stages/{name}.json").read_text())
        for name in ("bad", "good")
    }
    assert records["bad"]["status"] == "failed" and records["good"]["status"] == "done"
    # Both commands ran at once (each takes seconds to start: they overlap, not follow).
    good_started, good_ended = records["good"]["started"], records["good"]["ended"]
    assert records["bad"]["started"] < good_ended and good_started < records["bad"]["ended"]
    # `after` started only if `good` freed its slot before `bad` failed; either way it is done.
    after = tmp_path / "runs/t/stages/after.json"
    assert not after.exists() or json.loads(after.read_text())["status"] == "done"
    eval_stage(tmp_path, "bad", "#### 579")  # mended: --resume runs it, `good` stays done
    code, summary = run(capsys, recipe, "--resume")
    assert code == 0 and "good" not in ran(summary) and "bad" in ran(summary)
