"""R1's rejection-sampling filters: each drops a hand-made sample with its reason."""

from __future__ import annotations

import json
import random

import pytest

from deploy.cli import main as aha
from pipeline.rs import REASONS, FilterConfig, check_sample, mix_direct, reject, report_path
from pipeline.samples import ProblemSamples, Sample

GOOD = "<think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>"
RIGHT = {"accuracy_gsm8k": 1.0, "format_think": 1.0}


def sample(text=GOOD, components=RIGHT, reward=1.1, finish="stop", n_tokens=None) -> Sample:
    return Sample(
        text=text,
        components=components,
        reward=reward,
        finish_reason=finish,
        n_tokens=n_tokens,
    )


def problem(*samples: Sample, pid="1") -> ProblemSamples:
    return ProblemSamples(id=pid, prompt="Q:123+456=", reference="579", samples=list(samples))


CASES = {
    "truncated": sample(finish="length"),
    "undecided": sample(components={"accuracy_gsm8k": None, "format_think": 1.0}, reward=None),
    "incorrect": sample(
        text="<think>3+6+0=9</think><answer>578</answer>",
        components={"accuracy_gsm8k": 0.0, "format_think": 1.0},
        reward=0.1,
    ),
    "malformed": sample(text="<answer>579</answer>"),  # right, but no thought
    "mixed_language": sample(text="<think>先算个位 then add 3+6=9</think><answer>579</answer>"),
    "code_in_thought": sample(text="<think>\n```python\nprint(123+456)\n```\n</think>579"),
    "long_paragraph": sample(text="<think>" + "1+1=2," * 400 + "</think><answer>579</answer>"),
}


@pytest.mark.parametrize("reason", list(CASES))
def test_each_filter_drops_its_case_with_its_reason(reason):
    config = FilterConfig(max_paragraph_chars=2000)
    assert check_sample(CASES[reason], code_task=False, config=config) == reason
    rows, report = reject([problem(CASES[reason], sample())], config)
    assert report["dropped"][reason] == 1
    assert sum(report["dropped"].values()) == 1
    assert [r["response"] for r in rows] == [GOOD]


def test_a_clean_sample_passes_every_filter():
    assert check_sample(sample(), code_task=False, config=FilterConfig()) is None


def test_the_first_failing_filter_is_the_one_counted():
    # Truncated *and* wrong *and* without a thought: counted once, as truncated.
    s = sample(text="578", components={"accuracy_gsm8k": 0.0}, reward=0.0, finish="length")
    _, report = reject([problem(s)], FilterConfig())
    assert report["dropped"] == {r: int(r == "truncated") for r in REASONS}


def test_code_blocks_in_the_thought_are_kept_for_a_code_task():
    text = "<think>\n```python\ndef f(): return 1\n```\n</think>\n```python\ndef f(): return 1\n```"
    s = sample(text=text, components={"code_tests": 1.0, "format_think": 1.0})
    rows, report = reject([problem(s)], FilterConfig())  # code_tests: a code task by itself
    assert report["kept"] == 1 and report["dropped"]["code_in_thought"] == 0
    _, report = reject([problem(s)], FilterConfig(code_task=False))
    assert report["dropped"]["code_in_thought"] == 1


def test_answer_tag_makes_a_bare_answer_malformed():
    s = sample(text="<think>3+6+0=9</think>579")
    assert check_sample(s, False, FilterConfig()) is None
    assert check_sample(s, False, FilterConfig(answer_tag=True)) == "malformed"


def test_a_thought_with_no_words_is_not_mixed_and_a_mostly_english_one_passes_the_share():
    assert check_sample(sample(), False, FilterConfig(min_language_share=1.0)) is None
    # 19 English words and 1 Chinese one: share 0.95, the default threshold.
    text = "<think>" + "add " * 19 + "加</think><answer>579</answer>"
    assert check_sample(sample(text=text), False, FilterConfig()) is None
    assert check_sample(sample(text=text), False, FilterConfig(min_language_share=0.96)) == (
        "mixed_language"
    )


def test_correct_without_components_uses_the_total_reward():
    s = Sample(text=GOOD, reward=1.0)
    assert check_sample(s, False, FilterConfig()) is None
    assert check_sample(s, False, FilterConfig(min_reward=1.05)) == "incorrect"
    # Asked for a component the sample was not scored by: not known to be right.
    assert check_sample(s, False, FilterConfig(accuracy="accuracy_math")) == "incorrect"


def test_duplicates_within_a_problem_are_dropped_whitespace_aside():
    comma = GOOD.replace(",", ", ")  # a space where GOOD has none: another text
    # A trailing space or a line break instead of a space: the same text.
    rows, report = reject([problem(sample(), sample(text=GOOD + " \n"), sample())], FilterConfig())
    assert report["dropped"]["duplicate"] == 2 and report["kept"] == 1
    rows, report = reject([problem(sample(), sample(text=comma))], FilterConfig())
    assert report["dropped"]["duplicate"] == 0 and report["kept"] == 2
    # The same text under two problems is kept for each.
    rows, report = reject([problem(sample(), pid="1"), problem(sample(), pid="2")], FilterConfig())
    assert report["kept"] == 2


def test_at_most_m_per_prompt_the_shortest_first():
    texts = [f"<think>{'x' * n}</think><answer>579</answer>" for n in (9, 3, 6, 1)]
    p = problem(*(sample(text=t) for t in texts))
    rows, report = reject([p], FilterConfig(max_per_prompt=2))
    assert [r["response"] for r in rows] == [texts[3], texts[1]]  # lengths 1 and 3
    assert report["dropped"]["over_limit"] == 2
    # n_tokens, when given, is the length that counts.
    p = problem(sample(text=texts[0], n_tokens=2), sample(text=texts[3], n_tokens=5))
    rows, _ = reject([p], FilterConfig(max_per_prompt=1))
    assert [r["response"] for r in rows] == [texts[0]]


def test_random_pick_is_seeded():
    texts = [f"<think>{i}</think><answer>579</answer>" for i in range(6)]
    p = problem(*(sample(text=t) for t in texts))
    config = FilterConfig(max_per_prompt=3, pick="random", seed=7)
    first, _ = reject([p], config)
    again, _ = reject([p], config)
    assert first == again
    assert [r["response"] for r in first] == random.Random(7).sample(texts, 3)


def test_direct_pairs_make_their_share_of_the_output():
    rows = [{"prompt": f"p{i}", "response": "r", "id": str(i), "source": "rs"} for i in range(6)]
    direct = [{"prompt": f"d{i}", "response": "x"} for i in range(10)]
    # share 0.25 of the output: 6 reasoning rows + 2 direct = 8 lines (R1's 600k + 200k).
    mixed = mix_direct(rows, direct, FilterConfig(direct_share=0.25))
    assert sum(r["source"] == "direct" for r in mixed) == 2 and len(mixed) == 8
    # share 0.75 wants 18 but the file has 10: all of them.
    mixed = mix_direct(rows, direct, FilterConfig(direct_share=0.75))
    assert sum(r["source"] == "direct" for r in mixed) == 10
    assert mix_direct(rows, direct, FilterConfig()) == rows


def _write_samples(path, problems):
    path.write_text("".join(p.model_dump_json() + "\n" for p in problems))


def test_aha_rs_writes_sft_pairs_and_the_report(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    _write_samples(samples, [problem(*CASES.values(), sample(), sample(), pid="1")])
    direct = tmp_path / "direct.jsonl"
    direct.write_text(json.dumps({"prompt": "Q:001+002=", "response": "<think></think>3"}) + "\n")
    out = tmp_path / "rs.jsonl"
    code = aha(
        [
            "rs",
            "--samples-from",
            str(samples),
            "-o",
            str(out),
            "--direct",
            str(direct),
            "--direct-share",
            "0.5",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kept"] == 1 and report["direct"] == 1 and report["lines"] == 2
    assert report["dropped"] == {**{r: 1 for r in CASES}, "duplicate": 1, "over_limit": 0}
    assert json.loads(report_path(out).read_text()) == report
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["source"] for r in lines) == ["direct", "rs"]
    assert {r["prompt"] for r in lines} == {"Q:123+456=", "Q:001+002="}


def test_aha_rs_rescores_with_rewards_and_does_not_trust_the_file(tmp_path, capsys):
    # The file claims a wrong answer is right; scored again, it is incorrect.
    liar = sample(text="<think>3+6=9</think><answer>578</answer>")
    samples = tmp_path / "samples.jsonl"
    _write_samples(samples, [problem(liar, sample())])
    out = tmp_path / "rs.jsonl"
    rewards = json.dumps({"accuracy_gsm8k": 1.0, "format_think": 0.1})
    args = ["rs", "--samples-from", str(samples), "-o", str(out), "--rewards", rewards]
    assert aha([*args, "--workers", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dropped"]["incorrect"] == 1 and report["kept"] == 1


@pytest.mark.parametrize(
    ("line", "extra", "expected"),
    [
        ({"id": "1", "reference": "5", "samples": [{"text": "x", "reward": 1}]}, [], "prompt:"),
        (
            {"id": "1", "prompt": "p", "reference": "5", "samples": [{"text": "x"}]},
            [],
            "samples.0: not scored; give --rewards",
        ),
        (
            {"id": "1", "prompt": "p", "reference": "5", "samples": [{"text": "x", "reward": 1}]},
            ["--direct-share", "0.25"],
            "direct_share: needs a file",
        ),
        (
            {"id": "1", "prompt": "p", "reference": "5", "samples": [{"text": "x", "reward": 1}]},
            ["--language", "xx"],
            "language: no script known",
        ),
        (
            {"id": "1", "prompt": "p", "reference": "5", "samples": [{"text": "x", "reward": 1}]},
            ["--direct-share", "1"],
            "direct_share: Input should be less than 1",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys, line, extra, expected):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(line) + "\n")
    out = tmp_path / "rs.jsonl"
    assert aha(["rs", "--samples-from", str(samples), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aha rs: error: ") and expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_rs_needs_one_source(tmp_path, capsys):
    assert aha(["rs", "-o", str(tmp_path / "rs.jsonl")]) == 2
    assert "either --samples-from FILE or --model DIR" in capsys.readouterr().err


def test_skipped_filters_keep_what_they_would_drop():
    # The control of R1's second finding: the same samples, unfiltered.
    everything = set(REASONS) - {"over_limit"}
    config = FilterConfig(skip=everything, max_per_prompt=100)
    rows, report = reject([problem(*CASES.values(), sample(), sample())], config)
    assert report["kept"] == len(CASES) + 2
    assert sum(report["dropped"].values()) == 0
    # Skipping one filter lets its case through, and only its case.
    rows, report = reject([problem(*CASES.values())], FilterConfig(skip={"incorrect"}))
    assert [r["response"] for r in rows] == [CASES["incorrect"].text]


def test_an_adversarial_thought_is_filtered_in_linear_time():
    import time

    # 200,000 newlines: `^\s*` from every line start took minutes; every filter is linear.
    text = "<think>1+1=2" + "\n" * 200_000 + "</think><answer>579</answer>"
    started = time.monotonic()
    assert check_sample(sample(text=text), False, FilterConfig()) is None
    assert time.monotonic() - started < 2
