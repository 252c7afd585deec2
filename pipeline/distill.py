"""`aha distill --teacher DIR --student DIR --prompts FILE -o OUT`: R1's distillation.

The teacher answers every prompt `k` times; its samples go through rejection sampling
(`pipeline.rs`: correct, well-formed, clean, at most m per prompt); the student is fine-tuned
(`aha sft`) on the kept texts. The student learns from text, re-tokenized by its own
tokenizer, so it may have another size or vocabulary than the teacher.

    OUT/samples.jsonl      the teacher's scored samples
    OUT/rs.jsonl           the kept pairs, OUT/rs.report.json their counts
    OUT/model/             the student after SFT
    OUT/distill.json       the counts and the SFT settings
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.steps import distill
from protocol.config import ConfigError


def main(args) -> int:
    """The `aha distill` command: checks every input, then `distill` into `-o`."""
    from pipeline.recipe import DistillStage

    for flag, path in (("--teacher", args.teacher), ("--student", args.student)):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{flag}: no model at {path} (no config.json)")
    if not Path(args.prompts).is_file():
        raise ConfigError(f"--prompts: no such file ({args.prompts})")
    out = Path(args.output)
    if (out / "model").exists():
        raise ConfigError(f"-o: a distilled model is there already ({out / 'model'})")
    values = {"name": "distill", "kind": "distill", "teacher": args.teacher}
    values |= {"student": args.student, "prompts": args.prompts}
    if args.local:
        values["sampler"] = "local"
    for field in ("k", "steps", "batch", "lr", "temperature", "max_tokens", "seed"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.m is not None:
        values["filters"] = {"max_per_prompt": args.m}
    from pydantic import ValidationError

    try:
        stage = DistillStage.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    from pipeline.generate import read_prompt_file

    settings = stage.prompt_settings  # every row checked before the teacher loads:
    read_prompt_file(args.prompts, settings.prompt_field, settings.answer_field)
    from protocol.log import setup_logging

    setup_logging("distill")
    result = distill(
        Path(args.teacher), Path(args.student), Path(args.prompts), out, out / "model", stage
    )
    print(json.dumps(result) if args.json else f"wrote {out / 'model'}", flush=True)
    print(
        f"teacher samples {result['teacher_samples']}, kept {result['kept']}, "
        f"student SFT {result['steps']} steps on {result['examples']} pairs",
        file=sys.stderr,
    )
    return 0
