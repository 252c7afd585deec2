"""Prompt files for the dispatcher: sources mixed by weight, per-row rewards, Parquet/Arrow,
over-long prompts left out."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from learner.config import DatasetConfig
from learner.datasets import PROMPTS_TOO_LONG, shares
from learner.dispatcher import Dispatcher, load_problems
from protocol.config import ConfigError

DEFAULT_REWARDS = {"accuracy_gsm8k": 1.0, "format_think": 0.1}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shares_split_the_rows_by_weight_in_whole_rows():
    assert shares(20, [1, 3]) == [5, 15]
    # 10 at 2:1: quotas 6.67 and 3.33 -> 6 and 3, the row left to the larger remainder
    assert shares(10, [2, 1]) == [7, 3]
    # 5 at 1:1:1: 1.67 each -> 1, 1, 1 and the two rows left to the first two (a tie)
    assert shares(5, [1, 1, 1]) == [2, 2, 1]
    # 3 at 2:1:1: quotas 1.5, 0.75, 0.75 -> 1, 0, 0; the two left to the larger remainders 0.75
    assert shares(3, [0.5, 0.25, 0.25]) == [1, 1, 1]


def test_two_mixed_files_are_drawn_in_their_weights_ratio(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"a{i}", "answer": i} for i in range(10)])
    b_rows = [{"q": f"b{i}", "a": i} for i in range(4)]
    b_rows[2]["rewards"] = {"accuracy_math": 1.0}  # this row's own rewards
    b = write_jsonl(tmp_path / "b.jsonl", b_rows)
    dataset = DatasetConfig.model_validate(
        {
            "path": str(a),
            "weight": 1,
            "template": "none",
            "mix_size": 20,
            "sources": [
                {
                    "path": str(b),
                    "weight": 3,
                    "prompt_field": "q",
                    "answer_field": "a",
                    "meta": {"language": "zh"},
                }
            ],
        }
    )
    dispatcher = Dispatcher(dataset, load_problems(dataset), key="run1")
    # one pass = 20 positions: 20 x 1/4 = 5 from a.jsonl, 20 x 3/4 = 15 from b.jsonl
    for first in (0, 20):
        tasks = [dispatcher.task(p, version=0) for p in range(first, first + 20)]
        by_file = Counter(t.prompt_id.split(":")[0] for t in tasks)
        assert by_file == {"0": 5, "1": 15}
        # a's 5 are 5 different rows; b's 15 are its 4 rows 4, 4, 4 and 3 times
        assert len({t.prompt for t in tasks if t.prompt.startswith("a")}) == 5
        assert sorted(Counter(t.prompt for t in tasks if t.prompt.startswith("b")).values()) == [
            3,
            4,
            4,
            4,
        ]
    # rewards and meta: the row's own, else its source's, else the dataset's
    for p in range(20):
        task = dispatcher.task(p, version=0)
        if task.prompt == "b2":
            assert task.rewards == {"accuracy_math": 1.0} and task.meta == {"language": "zh"}
        elif task.prompt.startswith("b"):
            assert task.rewards == DEFAULT_REWARDS and task.meta == {"language": "zh"}
        else:
            assert task.rewards == DEFAULT_REWARDS and task.meta == {}


def test_parquet_and_arrow_files_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"question": "1+1", "answer": "2", "rewards": None},
        {"question": "2+2", "answer": "4", "rewards": {"accuracy_math": 2.0}},
    ]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    write_jsonl(tmp_path / "j.jsonl", rows)
    read = {}
    for name in ("p.parquet", "saved", arrow.relative_to(tmp_path), "j.jsonl"):
        dataset = DatasetConfig(path=str(tmp_path / name), template="none")
        read[str(name)] = [
            (p.prompt_id, p.prompt, p.reference, p.rewards) for p in load_problems(dataset)
        ]
    expected = [("0", "1+1", "2", None), ("1", "2+2", "4", {"accuracy_math": 2.0})]
    assert all(got == expected for got in read.values()), read


def test_a_bad_row_of_a_parquet_file_is_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"question": "x", "answr": "1"}]).to_parquet(
        str(tmp_path / "p.parquet")
    )
    with pytest.raises(ConfigError, match=r"no field 'answer' \(.*p\.parquet#0\)"):
        load_problems(DatasetConfig(path=str(tmp_path / "p.parquet")))
    (tmp_path / "n.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"not a readable dataset: .*n\.parquet\)"):
        load_problems(DatasetConfig(path=str(tmp_path / "n.parquet")))


def test_prompts_over_the_maximum_length_are_counted_not_issued(tmp_path):
    # no tokenizer (a model.qwen2 policy): the length is in characters
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "x" * n, "answer": "1"} for n in (3, 9, 5, 12, 4)]
    )
    dataset = DatasetConfig(path=str(path), template="none", max_prompt_length=5)
    problems = load_problems(dataset)
    assert [p.prompt_id for p in problems] == ["0", "2", "4"]  # 9 and 12 characters left out
    assert PROMPTS_TOO_LONG._value.get() == 2
    with pytest.raises(ConfigError, match="every prompt is longer than 2"):
        load_problems(dataset.model_copy(update={"max_prompt_length": 2}))
