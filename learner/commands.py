"""`aha learner`, `aha export` and `aha sft`: parse the config first, then import torch and DeepSpeed.

`aha learner` starts its own ranks (`learner.launch`). `aha export` and `aha sft` run as one
process, or under `torchrun --nproc_per_node=N -m deploy.cli ...` with the same number of ranks
the checkpoint was written with (ZeRO shards are per rank).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.config import ConfigError, config_from_args


def _learner_config(args: argparse.Namespace, **flags):
    from learner.config import LearnerConfig

    return config_from_args(LearnerConfig, args, "learner", flags)


def export(args: argparse.Namespace) -> int:
    """Restore a DeepSpeed checkpoint and write it as an HF folder at `args.out`."""
    config = _learner_config(args)
    from learner.engine import load_checkpoint, setup_engine
    from learner.weights import export_model

    config = config.model_copy(update={"grpo": config.grpo.model_copy(update={"beta": 0.0})})
    pe = setup_engine(config)
    directory = args.checkpoint or config.checkpoint_dir
    if load_checkpoint(pe, directory, args.tag) is None:
        raise ConfigError(f"no checkpoint in {directory}")
    export_model(
        pe.module,
        args.out,
        args.dtype or config.serving_dtype,
        config.shard_mb,
        rank=pe.rank,
        tokenizer_from=config.model.path,
    )
    if pe.rank == 0:
        print(f"exported {directory} to {Path(args.out).resolve()}")
    return 0


def sft(args: argparse.Namespace) -> int:
    """Fine-tune the configured model on prompt/response pairs and write an HF folder."""
    config = _learner_config(args)
    if config.model.path is None:
        raise ConfigError("learner.model.path: aha sft needs an HF folder (for its tokenizer)")
    from transformers import AutoTokenizer

    from learner.engine import setup_engine
    from learner.sft import read_pairs, tokenize_pairs, train_sft
    from learner.weights import export_model

    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    examples = tokenize_pairs(
        tokenizer, read_pairs(args.data, args.prompt_field, args.response_field)
    )
    config = config.model_copy(update={"grpo": config.grpo.model_copy(update={"beta": 0.0})})
    pe = setup_engine(config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = args.batch or config.batch
    train_sft(pe, examples, steps=args.steps, batch=batch, pad_id=pad_id, seed=config.seed)
    export_model(
        pe.module,
        args.out,
        config.serving_dtype,
        config.shard_mb,
        rank=pe.rank,
        tokenizer_from=config.model.path,
    )
    if pe.rank == 0:
        print(f"wrote {Path(args.out).resolve()}")
    return 0


def learner(args: argparse.Namespace) -> int:
    """`aha learner`: the GRPO learner; with several ranks or nodes, the launcher of its ranks."""
    import asyncio
    import os

    config = _learner_config(args, max_steps=args.max_steps, **{"bus.url": args.nats_url})
    from protocol.log import setup_logging

    setup_logging("learner")
    # One torch thread per process on CPU: more were 2-35x slower here (DEMO.md, issue 4).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from learner.launch import is_worker, launch, local_ranks

    if not is_worker() and (config.nodes > 1 or local_ranks(config) > 1):
        return launch(config, args)  # starts this command again once per rank
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from learner.loop import run
    from protocol.stage import Stopped

    try:
        return asyncio.run(run(config, resume=args.resume))
    except Stopped as e:  # a signal before its first fetch, or a second one while stopping
        import structlog

        log = structlog.get_logger("learner")
        log.info("learner stopped at once", signal=e.signal, why=e.why)
        return 0
