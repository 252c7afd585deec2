"""The demo task's data, checked by hand."""

from __future__ import annotations

import random

from pipeline.demo import answer_of_chain, chain, cold_start, held_out, prompt, response, rl_prompts


def test_the_chain_adds_column_by_column_from_the_right():
    assert prompt(123, 456) == "Q:123+456="
    assert prompt(7, 64) == "Q:007+064="
    # 3+6=9, 2+5=7, 1+4=5 -> 579
    assert response(chain(123, 456), "579") == (
        "<think>3+6+0=9,2+5+0=7,1+4+0=5</think><answer>579</answer>"
    )
    # 9+9=18 carry 1; 9+9+1=19 carry 1; 9+9+1=19 -> digits 9,9,8 and the last carry: 1998
    assert chain(999, 999) == "9+9+0=18,9+9+1=19,9+9+1=19"
    assert answer_of_chain(chain(999, 999)) == "1998"
    assert answer_of_chain(chain(5, 5)) == "10"  # 5+5=10, 0+0+1=1, 0+0+0=0 -> 010 -> 10


def test_dropped_carries_give_the_wrong_sum_the_chain_implies():
    buggy = chain(987, 456, drop_carry=1.0, rng=random.Random(0))
    # every carry forgotten: 7+6=13, 8+5+0=13, 9+4+0=13 -> 1333 (the true sum is 1443)
    assert buggy == "7+6+0=13,8+5+0=13,9+4+0=13"
    assert answer_of_chain(buggy) == "1333"


def test_held_out_problems_never_reach_training():
    evaluation = held_out(500)
    assert len({r["prompt"] for r in evaluation}) == 500
    exclude = {r["prompt"] for r in evaluation}
    train = rl_prompts(2000, seed=1, exclude=exclude) + cold_start(2000, seed=2, exclude=exclude)
    assert not exclude & {r["prompt"] for r in train}
    row = evaluation[0]
    a, b = (int(x) for x in row["prompt"][2:-1].split("+"))
    assert row["answer"] == str(a + b)


def test_recipe_b_mixes_chains_and_direct_answers():
    rows = cold_start(2000, seed=3, exclude=set(), chain_share=0.4)
    direct = [r for r in rows if r["response"].startswith("<think></think>")]
    assert 0.55 < len(direct) / len(rows) < 0.65
    for r in rows:  # both kinds are right: recipe B's flaw is guessing, not arithmetic
        a, b = (int(x) for x in r["prompt"][2:-1].split("+"))
        assert r["response"].endswith(f"<answer>{a + b}</answer>")
