"""How a completion is read: the chain of thought inside `<think>…</think>`, then the answer.

Every reward, the code sandbox's program extraction and the R1 metrics split a completion the
same way, through `split_think`.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(completion: str) -> tuple[str | None, str]:
    """(chain of thought or None, answer part) of a completion.

    `<think>a</think>b` -> ("a", "b"); `<think>a` (unclosed) -> ("a", ""); `b` -> (None, "b");
    a `<think>` reopened after the last `</think>` ends the answer there.
    """
    if THINK_CLOSE in completion:
        thought, _, answer = completion.rpartition(THINK_CLOSE)
        thought = thought.split(THINK_OPEN, 1)[-1]
        return thought, answer.split(THINK_OPEN, 1)[0]
    if THINK_OPEN in completion:
        return completion.split(THINK_OPEN, 1)[1], ""
    return None, completion
