"""A tiny Qwen2 model and a character-level tokenizer, built offline from a config.

`aha up`'s demo and every test that needs a model use this: no download, a few seconds on a
CPU, and the result is an ordinary HF folder (config.json, model.safetensors, tokenizer
files, generation_config.json) that `transformers.AutoModelForCausalLM` / `AutoTokenizer`
and vLLM load like any other model.

The tokenizer has one token per character of `TinySpec.characters`, the R1-Zero tags
`<think>`, `</think>`, `<answer>`, `</answer>` as single tokens, and pad/bos/eos. The tags
are ordinary (not special) added tokens so decoding with `skip_special_tokens=True` keeps
them in the text the rewarders parse. There is no `<unk>`: a character outside the
vocabulary is dropped when encoding (Qwen2's byte-level BPE does that), so give `TinySpec`
every character your task uses.

    python -m pipeline.tiny_model /tmp/tiny          # build one with the demo's defaults
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
"""The R1-Zero template tags, each a single token."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

DEFAULT_CHARACTERS = "0123456789+=:,Q ?.-*A"
"""21 characters: enough for the addition demo (`Q:123+456=`) and a little slack."""


@dataclass(frozen=True)
class TinySpec:
    """What to build. The defaults are the tests' model: DEMO.md's (hidden 64, 3 layers, FFN
    192, tied embeddings: 162,560 parameters) with 2 heads of 32 instead of 4 of 16, which
    vLLM's CPU attention cannot run. `aha up`'s demo trains `DEMO_SPEC`."""

    characters: str = DEFAULT_CHARACTERS
    """Every character the tokenizer knows, one token each, in this order after the specials."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 3
    """Decoder layers."""
    num_heads: int = 2
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (fewer than `num_heads` for grouped-query attention)."""
    head_dim: int | None = None
    """Width of each head; None: `hidden_size // num_heads`. vLLM's CPU attention needs 32,
    64, 80, 96, …, so 4 heads at width 64 need `head_dim = 32` (queries wider than the model,
    projected back), which only a `qwen3` model carries to vLLM: its Qwen2 ignores it."""
    model_type: Literal["qwen2", "qwen3"] = "qwen2"
    """`qwen2`, or `qwen3`: Qwen2 with an explicit `head_dim`, RMS-normed queries and keys
    and no q/k/v biases."""
    intermediate_size: int = 192
    """FFN width."""
    max_position_embeddings: int = 256
    """Longest prompt + completion, in tokens."""
    add_bos: bool = True
    """Whether encoding text prepends `<bos>` (HF and vLLM then tokenize prompts alike)."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self):
        if self.model_type not in ("qwen2", "qwen3"):
            raise ValueError(f"model_type: qwen2 or qwen3, got {self.model_type!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads")
        if self.model_type == "qwen2" and self.head_dim not in (
            None,
            self.hidden_size // self.num_heads,
        ):
            raise ValueError(
                f"head_dim {self.head_dim} with model_type qwen2: vLLM's Qwen2 takes heads of "
                f"hidden_size / num_heads; use model_type qwen3"
            )

    @property
    def vocab(self) -> list[str]:
        if len(set(self.characters)) != len(self.characters):
            raise ValueError(f"duplicate characters in {self.characters!r}")
        return [PAD, BOS, EOS, *self.characters, *TAGS]


DEMO_SPEC = TinySpec(num_heads=4, num_kv_heads=4, head_dim=32, model_type="qwen3")
"""`aha up`'s demo model: DEMO.md's width, depth and FFN with 4 heads of 32 (211,328
parameters), which vLLM's CPU attention runs. With DEMO.md's 2 heads of 32 the demo's GRPO
ended at pass@1 0.69 where this model reaches 0.93 (README, "What limits pass@1")."""


def build_tokenizer(spec: TinySpec = TinySpec()):
    """A `Qwen2Tokenizer`: one token per character, the tags as single tokens.

    transformers 5 loads every `model_type: qwen2` folder's tokenizer as `Qwen2Tokenizer`
    (byte-level BPE) whatever class the folder names, so we build exactly that: a byte-level
    BPE whose vocabulary is our characters (in the byte-level alphabet, e.g. space is `Ġ`)
    and no merges, which makes it character-level. `AutoTokenizer`,
    `PreTrainedTokenizerFast` and vLLM then all tokenize alike.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    vocab = {}
    for i, token in enumerate(spec.vocab):
        if token in (PAD, BOS, EOS, *TAGS):
            vocab[token] = i
        else:
            if ord(token) > 127:
                raise ValueError(f"only ASCII characters are supported, got {token!r}")
            vocab[byte_char[ord(token)]] = i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=spec.add_bos,
        padding_side="left",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    # Ordinary added tokens: matched whole before BPE, kept by skip_special_tokens.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    # A minimal template for chat-style callers: the user's text, nothing added.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def build_model(spec: TinySpec = TinySpec()):
    """A randomly initialised float32 `Qwen2ForCausalLM` (or `Qwen3…`) sized by `spec`, tied
    embeddings."""
    import torch
    import transformers

    family = "Qwen3" if spec.model_type == "qwen3" else "Qwen2"
    vocab = spec.vocab
    extra = {} if spec.head_dim is None else {"head_dim": spec.head_dim}
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(vocab),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        use_sliding_window=False,
        pad_token_id=vocab.index(PAD),
        bos_token_id=vocab.index(BOS),
        eos_token_id=vocab.index(EOS),
        torch_dtype="float32",
        **extra,
    )
    torch.manual_seed(spec.seed)
    return getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float32).eval()


def save_tiny_model(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build the tokenizer and the model and save both as an HF folder at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    model = build_model(spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="output folder")
    p.add_argument("--characters", default=DEFAULT_CHARACTERS)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = TinySpec(
        characters=args.characters,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    print(save_tiny_model(args.path, spec))


if __name__ == "__main__":
    main()
