"""SFT: the loss covers response tokens only, and a few steps lower it."""

import math
from types import SimpleNamespace

import pytest
import torch

from learner.config import DeepSpeedConfig, GRPOConfig, LearnerConfig, ModelConfig, OptimConfig
from learner.engine import setup_engine
from learner.logprobs import completion_logprobs, pad_batch
from learner.sft import read_pairs, sft_loss, train_sft

from .conftest import TINY_QWEN2

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits = table[id]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def test_prompt_tokens_are_not_in_the_loss():
    # V = 3. Row k of the table gives p(· | k):
    #   after 0: logits [0, ln 3, 0]  -> p = [1/5, 3/5, 1/5]
    #   after 1: logits [0, 0, ln 2]  -> p = [1/4, 1/4, 2/4]
    #   after 2: logits [ln 4, 0, 0]  -> p = [4/6, 1/6, 1/6]
    # prompt [0, 1], response [2, 0]:
    #   response NLL = -(ln p(2|1) + ln p(0|2)) / 2 = -(ln 1/2 + ln 2/3) / 2 = ln 3 / 2 = 0.549306
    #   (with the prompt's own token it would include -ln p(1|0) = -ln 3/5 as well)
    table = torch.tensor(
        [[0.0, math.log(3), 0.0], [0.0, 0.0, math.log(2)], [math.log(4), 0.0, 0.0]]
    )
    model = Bigram(table)
    prompt_ids, prompt_mask, completion_ids, completion_mask = pad_batch([[0, 1]], [[2, 0]])
    logp = completion_logprobs(model, prompt_ids, completion_ids, 1.0, prompt_mask, completion_mask)
    assert sft_loss(logp, completion_mask).item() == pytest.approx(math.log(3) / 2)
    # a second, padded example with a longer prompt changes nothing for the first one:
    # prompt [2, 2, 0], response [1] -> NLL -ln p(1|0) = -ln 3/5; token mean over 3 tokens
    # = (ln 3 + -ln 3/5) / 3
    batch = pad_batch([[0, 1], [2, 2, 0]], [[2, 0], [1]])
    logp = completion_logprobs(model, batch[0], batch[2], 1.0, batch[1], batch[3])
    expected = (math.log(3) - math.log(3 / 5)) / 3
    assert sft_loss(logp, batch[3]).item() == pytest.approx(expected)


def test_a_few_steps_reduce_the_response_loss():
    config = LearnerConfig(
        model=ModelConfig(qwen2=TINY_QWEN2),
        optim=OptimConfig(lr=1e-2),
        deepspeed=DeepSpeedConfig(zero_stage=1, precision="fp32", micro_batch=2),
        grpo=GRPOConfig(beta=0.0),
    )
    pe = setup_engine(config)
    # "a b c" -> "c b a": 4 examples, reversed digits as responses
    examples = [([1, 2, 3], [3, 2, 1]), ([4, 5], [5, 4]), ([6, 7, 8, 9], [9, 8]), ([10], [11, 12])]
    history = train_sft(pe, examples, steps=12, batch=4)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["tokens"] == 9


def test_read_pairs_names_a_missing_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n\n{"question": "x"}\n')
    with pytest.raises(ValueError, match="d.jsonl:3: no field 'prompt'"):
        read_pairs(path)
    path.write_text('{"q": "1+1=", "a": 2}\n')
    assert read_pairs(path, "q", "a") == [("1+1=", "2")]
