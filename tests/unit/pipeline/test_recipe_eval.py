"""A recipe's held-out `eval` stage samples with its own temperature, top_p and max_tokens.

The stage samples in-process with the HF reference engine (`pipeline.heldout`), not through
the bus, so the seam is the `Sampling` the engine's `generate_batch` is called with: the
test records each call on its way to the real engine, which still generates. The values are
none of the defaults (1.0 / 1.0 / 64), so a stage that dropped any of them would fail here.
"""

from __future__ import annotations

import json
import textwrap

from actors.hf_engine import HfEngine
from deploy.cli import main as aha
from protocol.messages import Sampling


def test_a_recipe_eval_stage_samples_with_its_temperature_top_p_and_max_tokens(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    rows = [{"prompt": "Q:1+2=", "answer": "3"}, {"prompt": "Q:4+4=", "answer": "8"}]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            [pipeline]
            name = "t"
            runs_dir = "{tmp_path / "runs"}"

            [[stages]]
            name = "eval"
            kind = "eval"
            held_out = "held_out.jsonl"
            models = {{ tiny = "{tiny_model_dir}" }}
            k = 3
            temperature = 0.35
            top_p = 0.8
            max_tokens = 5
            """
        )
    )
    calls: list[tuple[Sampling, int, int]] = []
    generate_batch = HfEngine.generate_batch

    async def recorded(self, prompts, sampling, n):
        calls.append((sampling, n, len(prompts)))
        return await generate_batch(self, prompts, sampling, n)

    monkeypatch.setattr(HfEngine, "generate_batch", recorded)

    assert aha(["pipeline", str(recipe), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert calls == [
        (Sampling(temperature=0.0, max_tokens=5), 1, 2),  # greedy accuracy: one each
        (Sampling(temperature=0.35, top_p=0.8, max_tokens=5, seed=0), 3, 2),  # pass@1: k each
    ]
    (stage,) = summary["stages"]
    result = stage["result"]["tiny"]
    assert (result["samples"], result["temperature"], result["top_p"]) == (3, 0.35, 0.8)
    assert result["problems"] == 2 and 0 < result["mean_length"] <= 5
