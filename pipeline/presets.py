"""What `aha up` sets for a task: the dataset's fields, template and rewards.

The demo (`pipeline/demo.py`) and the two dataset formats `aha up --dataset` recognises from
their first row: GSM8K (`question`, answer ending `#### 72`) and MATH-500 (`problem`, a LaTeX
answer). Returned as the `[learner.dataset]` section's fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.config import read_jsonl


def dataset_settings(path: Path, *, demo: bool) -> dict[str, Any]:
    """Field mapping, template and rewards for the prompts in `path` (the demo's, or a
    GSM8K- or MATH-500-style file)."""
    if demo:  # {"prompt": "Q:123+456=", "answer": "579"}
        prompt_field, template, accuracy = "prompt", "none", "accuracy_gsm8k"
    else:
        _, first = next(read_jsonl(path))  # the first row, blank lines skipped
        if "question" in first:  # GSM8K: {"question", "answer": "... #### 72"}
            prompt_field, template, accuracy = "question", "r1-zero", "accuracy_gsm8k"
        else:  # MATH-500 and friends: {"problem", "answer"} (LaTeX)
            prompt_field, template, accuracy = "problem", "r1-zero", "accuracy_math"
    return {
        "path": str(path),
        "prompt_field": prompt_field,
        "answer_field": "answer",
        "template": template,
        "rewards": {accuracy: 1.0, "format_think": 0.1},
        "meta": {"answer_tag": True},
    }
