"""Learner throughput and weight-publish bandwidth, in one run.

    OMP_NUM_THREADS=1 python benchmarks/learner.py --hidden 256 --layers 4 --stage 0
    torchrun --nproc_per_node=2 benchmarks/learner.py --stage 2      # several ranks

Prints one JSON line: GRPO step time and tokens/s on a random batch (a Qwen2 built from a
config, fp32 on CPU, bf16 on GPU), then the time to write the weights as shards, to publish
them to an embedded NATS object store, and to copy the same bytes as plain files, each as
GB/s, so the object-store figure can be read against the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `learner` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage")
    p.add_argument(
        "--precision", default=None, help="fp32/bf16 (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--n", type=int, default=8, help="completions per step")
    p.add_argument("--micro-batch", type=int, default=4, help="completions per micro-batch")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion", type=int, default=128, help="completion tokens")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size for the publish test")
    p.add_argument("--dtype", default="bfloat16", help="serving dtype of the published weights")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from learner.config import LearnerConfig
    from learner.engine import PolicyBatch, setup_engine, train_step

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    heads = max(1, args.hidden // 64)
    config = LearnerConfig(
        model={
            "qwen2": dict(
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                intermediate_size=args.hidden * 3,
                num_hidden_layers=args.layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=args.prompt + args.completion,
                tie_word_embeddings=True,
            )
        },
        optim={"lr": 1e-6},
        deepspeed={
            "zero_stage": args.stage,
            "precision": precision,
            "micro_batch": args.micro_batch,
        },
        grpo={"beta": 0.0},
    )
    pe = setup_engine(config)
    g = torch.Generator().manual_seed(0)
    N, P, T = args.n, args.prompt, args.completion
    batch = PolicyBatch(
        prompt_ids=torch.randint(0, args.vocab, (N, P), generator=g),
        prompt_mask=torch.ones(N, P, dtype=torch.long),
        completion_ids=torch.randint(0, args.vocab, (N, T), generator=g),
        completion_mask=torch.ones(N, T, dtype=torch.long),
        adv=torch.randn(N, generator=g),
        logp_behaviour=torch.full((N, T), -10.0),
        temperature=1.0,
    )
    train_step(pe, batch)  # warm-up
    times = []
    for _ in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(pe, batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    result = {
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in pe.module.parameters()),
        "world_size": pe.world_size,
        "zero_stage": args.stage,
        "precision": precision,
        "device": str(pe.device),
        "step_s": round(step_s, 4),
        "completion_tokens_per_s": round(N * T / step_s, 1),
        "tokens_per_s": round(N * (P + T) / step_s, 1),
    }
    result.update(publish_figures(pe, args))
    if pe.rank == 0:
        print(json.dumps(result))


def publish_figures(pe, args) -> dict:
    """Write shards (all ranks gather), then on rank 0: object-store upload vs plain file copy."""
    from learner.weights import publish_weights, write_shards

    work = Path(tempfile.mkdtemp(prefix="aha-bench-"))
    started = time.perf_counter()
    shards = write_shards(pe.module, work / "v1", args.dtype, args.shard_mb, rank=pe.rank)
    write_s = time.perf_counter() - started
    if pe.rank != 0:
        return {}
    total = sum(s.bytes for s in shards)

    started = time.perf_counter()
    (work / "copy").mkdir()
    for s in shards:
        shutil.copyfile(work / "v1" / s.name, work / "copy" / s.name)
    copy_s = time.perf_counter() - started

    async def publish() -> float:
        from protocol.config import BusConfig
        from protocol.server import NatsServer
        from protocol.streams import connect, ensure_streams

        with NatsServer(work / "nats") as server:
            bus = BusConfig(url=server.url)
            nc = await connect(bus)
            js = nc.jetstream()
            await ensure_streams(js, bus)
            began = time.perf_counter()
            await publish_weights(
                js, work / "v1", shards, version=1, step=1, dtype=args.dtype, keep_versions=1
            )
            elapsed = time.perf_counter() - began
            await nc.close()
            return elapsed

    publish_s = asyncio.run(publish())
    shutil.rmtree(work, ignore_errors=True)
    gb = total / 1e9
    return {
        "weights_bytes": total,
        "shards": len(shards),
        "write_shards_gb_per_s": round(gb / write_s, 3),
        "publish_gb_per_s": round(gb / publish_s, 3),
        "file_copy_gb_per_s": round(gb / copy_s, 3),
    }


if __name__ == "__main__":
    main()
