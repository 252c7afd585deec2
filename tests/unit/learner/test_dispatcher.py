"""The dispatcher: dataset formats, prompt templates, the seeded order and its resume
position, deterministic task ids, and the in-flight bound kept by the ledger."""

import asyncio
import json
from pathlib import Path

import pytest

from learner.config import DatasetConfig, LearnerConfig, ModelConfig
from learner.dispatcher import (
    Dispatcher,
    Ledger,
    Reservation,
    load_problems,
    permutation,
    read_rows,
    task_position,
    top_up,
)
from pipeline.prompts import R1_ZERO, render_prompt
from protocol.config import ConfigError

DATA = Path(__file__).parents[2] / "data"


def test_gsm8k_and_math500_rows_out_of_the_box():
    gsm8k = read_rows(DATA / "gsm8k_test.jsonl", "question", "answer")
    question, reference = gsm8k[0]
    assert question.startswith("Janet") and reference.endswith("#### 18")  # the whole answer text
    math500 = read_rows(DATA / "math500_test.jsonl", "problem", "answer")
    assert (
        math500[0][0].startswith("Convert the point")
        and math500[0][1] == r"\left( 3, \frac{\pi}{2} \right)"
    )


def test_missing_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no field 'answer'"):
        read_rows(path, "prompt", "answer")


def test_templates(tiny_model_dir):
    from transformers import AutoTokenizer

    r1 = render_prompt("What is 2+2?", "r1-zero")
    assert r1 == R1_ZERO.format(prompt="What is 2+2?")
    assert r1.startswith("A conversation between User and Assistant.")
    assert "<think> </think> and <answer> </answer> tags" in r1
    assert r1.endswith("User: What is 2+2?. Assistant:")
    assert render_prompt("Q:1+2=", "none") == "Q:1+2="
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt("Q:1+2=", "chat", tokenizer) == "Q:1+2="  # the tiny model's template
    with pytest.raises(ValueError, match="chat template"):
        render_prompt("Q:1+2=", "chat", None)


def test_problems_are_tokenized_as_the_engines_encode_them(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "Q:123+456=", "answer": "579"}\n')
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = DatasetConfig(path=str(path), prompt_field="prompt", template="none")
    (problem,) = load_problems(dataset, tokenizer)
    assert problem.prompt == "Q:123+456=" and problem.reference == "579"
    assert problem.prompt_token_ids == tokenizer("Q:123+456=")["input_ids"]
    assert problem.prompt_token_ids[0] == tokenizer.bos_token_id


def test_seeded_order_covers_every_row_once_per_pass():
    assert permutation(0, 0, 10) == permutation(0, 0, 10)
    assert sorted(permutation(0, 0, 10)) == list(range(10))
    assert permutation(0, 0, 10) != permutation(0, 1, 10)  # a fresh shuffle per pass
    assert permutation(0, 0, 10) != permutation(1, 0, 10)


def make_dispatcher(tmp_path, n=5, seed=3):
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(f'{{"prompt": "Q:{i}", "answer": "{i}"}}\n' for i in range(n)))
    dataset = DatasetConfig(
        path=str(path), prompt_field="prompt", template="none", seed=seed, group_size=4
    )
    return Dispatcher(dataset, load_problems(dataset), key="run1")


def test_task_is_a_function_of_its_position(tmp_path):
    a, b = make_dispatcher(tmp_path), make_dispatcher(tmp_path)
    rows = [a.row(p) for p in range(10)]
    assert rows[:5] == permutation(3, 0, 5) and rows[5:] == permutation(3, 1, 5)
    # a restarted dispatcher jumps straight to position 7 and gets the same task, same id
    task = b.task(7, version=4)
    assert (
        task.task_id == "run1-7"
        and task.prompt == f"Q:{rows[7]}"
        and task.reference == str(rows[7])
    )
    assert task.issued_version == 4 and task.group_size == 4 and task.rewards == a.dataset.rewards
    assert task_position("run1", "run1-7") == 7
    assert task_position("run1", "run2-7") is None  # another run's task
    assert task_position("run-1", "run-1-12") == 12


class FakeBus:
    def __init__(self):
        self.published = []

    async def publish(self, stage, message):
        self.published.append(message.task_id)


def test_in_flight_never_exceeds_the_limit(tmp_path):
    dispatcher, ledger, bus = make_dispatcher(tmp_path), Ledger(), FakeBus()
    limit = LearnerConfig(model=ModelConfig(qwen2={}), batch=2, max_staleness=1).in_flight_limit
    assert limit == 4  # (η + 1) × batch

    async def scenario():
        assert (await top_up(bus, dispatcher, ledger, limit, version=0)).published == 4
        assert (await top_up(bus, dispatcher, ledger, limit, version=0)).published == 0  # full
        assert ledger.receive(1) == "new" and ledger.in_flight == 3
        assert (await top_up(bus, dispatcher, ledger, limit, version=0)).published == 1  # freed
        assert bus.published == [f"run1-{p}" for p in range(5)]
        assert ledger.in_flight == 4

    asyncio.run(scenario())


def test_ledger_across_a_crash():
    ledger = Ledger(reserved=12)  # what the reservation file says: a crash may issue up to 11
    for _ in range(6):
        ledger.issue()
    assert [ledger.receive(p) for p in (0, 1)] == ["new", "new"]
    ledger.commit()  # step 1 checkpointed: 0 and 1 consumed
    saved = ledger.state()
    assert saved == {"issued": 6, "outstanding": [2, 3, 4, 5], "ahead": [], "reserved": 12}
    assert ledger.receive(2) == "new" and ledger.receive(2) == "held"  # redelivered while held

    # The process dies; the successor starts from `saved` and the reservation file.
    ledger = Ledger.from_state(saved, reserved=12)
    assert ledger.receive(1) == "duplicate"  # checkpointed but its ack was lost
    assert ledger.receive(2) == "new"  # held by the dead process, never checkpointed
    assert ledger.receive(7) == "new"  # the dead process had issued up to 7 already
    ledger.release(2)  # stopping: handed back, in flight again
    assert ledger.outstanding == {2, 3, 4, 5} and ledger.held == {7}
    ledger.commit()
    assert [ledger.issue() for _ in range(3)] == [6, 7, 8]
    assert ledger.outstanding == {2, 3, 4, 5, 6, 8}  # 7's group was consumed before its re-issue
    assert ledger.receive(7) == "duplicate"
    with pytest.raises(RuntimeError):
        ledger.receive(3)
        ledger.state()  # held groups must be committed or released first


def test_only_reserved_positions_are_ours(tmp_path):
    # A forged group under this run's key but a position never reserved is foreign; the
    # reservation is on disk before any task at a position is published, and a successor
    # reads it back.
    dispatcher, bus = make_dispatcher(tmp_path), FakeBus()
    reservation = Reservation(tmp_path / "ckpt" / "reserved.json", chunk=4)
    ledger = Ledger(reserved=reservation.read())
    assert ledger.reserved == 0 and ledger.receive(0) == "foreign"

    asyncio.run(top_up(bus, dispatcher, ledger, 3, version=0, reservation=reservation))
    assert bus.published == ["run1-0", "run1-1", "run1-2"] and reservation.read() == 5
    assert ledger.receive(4) == "new"  # a crashed predecessor may have issued it
    assert ledger.receive(5) == "foreign" and ledger.receive(10**6) == "foreign"
    assert 10**6 not in ledger.held and ledger.in_flight == 3
    ledger.release(4)
    assert Ledger.from_state(ledger.state(), reservation.read()).receive(5) == "foreign"
    with pytest.raises(RuntimeError, match="before it was reserved"):
        Ledger().issue()


def test_a_task_is_checked_against_the_one_issued_at_its_position(tmp_path):
    dispatcher = make_dispatcher(tmp_path)
    task = dispatcher.task(2, version=0)
    assert dispatcher.mismatch(task, 2) is None
    assert "prompt_id" in dispatcher.mismatch(task, 3)  # another row's task under id 2
    forged = task.model_copy(
        update={"sampling": task.sampling.model_copy(update={"temperature": 7.0})}
    )
    assert dispatcher.mismatch(forged, 2) == "its task's sampling is not the one issued as run1-2"


def test_a_row_too_large_for_the_bus_is_skipped_and_counted(tmp_path):
    # Row 3's prompt alone is 300 kB: its task could never be published with a max_payload
    # of 256 KiB; the others fit. Configured groups that cannot fit stop at start.
    path = tmp_path / "rl.jsonl"
    rows = [
        {"prompt": "Q:" + ("x" * 300_000 if i == 3 else str(i)), "answer": str(i)} for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = DatasetConfig(
        path=str(path), prompt_field="prompt", template="none", group_size=4, max_tokens=256
    )
    dispatcher, bus, ledger = (
        Dispatcher(dataset, load_problems(dataset), "run1"),
        FakeBus(),
        Ledger(),
    )
    dispatcher.fit(256 * 1024)
    assert list(dispatcher.too_large) == [3]

    issued = asyncio.run(top_up(bus, dispatcher, ledger, 5, version=0))
    skipped = [p for p in range(6) if dispatcher.row(p) == 3]
    assert issued.too_large == [f"run1-{p}" for p in skipped] and issued.published == 5
    assert ledger.in_flight == 5 and ledger.issued == 6  # issued and dropped at once
    assert all(
        dispatcher.task(p, 0).prompt_id != "3" for p in range(6) if f"run1-{p}" in bus.published
    )

    with pytest.raises(
        ConfigError,
        match=r"learner\.dataset\.group_size × learner\.dataset\.max_tokens = 4 × 256 .* max_payload of 0\.0 MiB",
    ):
        dispatcher.fit(16 * 1024)
    small = dataset.model_copy(update={"path": str(path)})
    only_big = Dispatcher(small, [load_problems(dataset)[3]], "run1")
    with pytest.raises(ConfigError, match="learner.dataset.path: no row's scored group fits"):
        only_big.fit(256 * 1024)


def test_a_task_the_server_refuses_as_too_large_is_skipped_not_a_crash(tmp_path):
    # The backstop behind `fit`'s estimate: nats-py's MaxPayloadError on the publish.
    from nats.errors import MaxPayloadError

    class SmallBus(FakeBus):
        async def publish(self, stage, message):
            if message.task_id == "run1-1":
                raise MaxPayloadError
            await super().publish(stage, message)

    dispatcher, bus, ledger = make_dispatcher(tmp_path), SmallBus(), Ledger()
    issued = asyncio.run(top_up(bus, dispatcher, ledger, 3, version=0))
    assert issued.too_large == ["run1-1"] and bus.published == ["run1-0", "run1-2", "run1-3"]
    assert ledger.in_flight == 3 and ledger.issued == 4
