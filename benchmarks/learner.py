"""Learner throughput and weight-publish bandwidth, in one run.

    OMP_NUM_THREADS=1 python benchmarks/learner.py --hidden 256 --layers 4 --stage 0
    torchrun --nproc_per_node=2 benchmarks/learner.py --stage 2      # several ranks

Figures (`--json`: one JSON line each, `benchmarks/figures.py`): `learner_tokens`, the
tokens/s of each timed GRPO step on a random batch (a Qwen2 built from a config, fp32 on CPU,
bf16 on GPU); `learner_publish`, s/GB from "step done" to "manifest visible", what
`aha_learner_weight_publish_seconds` measures: `write_shards`, then `publish_weights` with the
learner's HTTP weight server and its background uploads (`StoreUploads`), as `learner.loop`
calls it, to an embedded NATS server, next to a plain copy of the same bytes in the same run;
`learner_publish_upload`, s/GB of the object-store copy that follows the manifest in the
background, timed from the manifest to the upload's end with nothing else running; both
over `--publish-runs` versions.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: the repository first (this file's name would shadow `learner`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import add_output_args, figure, report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--intermediate", type=int, help="MLP width (default: 3 x hidden)")
    p.add_argument("--heads", type=int, help="attention heads (default: hidden / 64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
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
    p.add_argument("--publish-runs", type=int, default=3, help="versions published")
    add_output_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import structlog

    # Logs to stderr: stdout carries the figures (one JSON line each with --json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    import torch

    from learner.config import LearnerConfig
    from learner.engine import PolicyBatch, setup_engine, train_step

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    heads = args.heads or max(1, args.hidden // 64)
    config = LearnerConfig(
        model={
            "qwen2": dict(
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                intermediate_size=args.intermediate or args.hidden * 3,
                num_hidden_layers=args.layers,
                num_attention_heads=heads,
                num_key_value_heads=args.kv_heads or heads,
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
    tokens = figure(
        "learner_tokens",
        "tokens/s",
        [N * (P + T) / t for t in times],
        params=sum(getattr(p, "ds_numel", p.numel()) for p in pe.module.parameters()),
        world_size=pe.world_size,
        zero_stage=args.stage,
        precision=precision,
        device=str(pe.device),
        completion_tokens_per_s=N * T / statistics.median(times),
    )
    publish = publish_figures(pe, args)
    if pe.rank == 0:
        report([tokens, *publish], args, "learner")


def publish_figures(pe, args) -> list[dict]:
    """Write shards (all ranks gather), then on rank 0 publish them as the learner does with
    its weight server on, and wait for the store upload that follows; a plain copy of the
    same bytes beside each version is the baseline. No figures on the other ranks."""
    from learner.weights import StoreUploads, publish_weights, write_shards
    from protocol.config import BusConfig
    from protocol.server import NatsServer
    from protocol.streams import connect, ensure_streams
    from protocol.weight_server import WeightServer, WeightServerConfig

    work = Path(tempfile.mkdtemp(prefix="aha-bench-"))
    runs, copies, writes, stores = [], [], [], []
    server = WeightServer(WeightServerConfig(host="127.0.0.1")).start() if pe.rank == 0 else None

    async def publish(version: int, shards, uploads: StoreUploads) -> tuple[float, float]:
        """Seconds to the manifest visible, then to the store copy's end."""
        began = time.perf_counter()
        await publish_weights(
            js,
            work / f"v{version}",
            shards,
            version=version,
            step=version,
            dtype=args.dtype,
            keep_versions=1,
            server=server,
            uploads=uploads,
        )
        visible = time.perf_counter()
        assert await uploads.drain(None) and uploads.uploaded[-1] == version
        return visible - began, time.perf_counter() - visible

    try:
        with NatsServer(work / "nats") as nats:
            bus = BusConfig(url=nats.url)
            loop = asyncio.new_event_loop()
            nc = loop.run_until_complete(connect(bus))
            js = nc.jetstream()
            loop.run_until_complete(ensure_streams(js, bus))
            uploads = StoreUploads(js, keep_versions=1)
            for version in range(1, args.publish_runs + 1):
                started = time.perf_counter()
                directory = work / f"v{version}"
                shards = write_shards(pe.module, directory, args.dtype, args.shard_mb, rank=pe.rank)
                write_s = time.perf_counter() - started
                if pe.rank != 0:
                    continue
                gb = sum(s.bytes for s in shards) / 1e9
                copies.append(copy_seconds(directory, shards, work / "copy") / gb)
                publish_s, store_s = loop.run_until_complete(publish(version, shards, uploads))
                runs.append((write_s + publish_s) / gb)
                writes.append(write_s / gb)
                stores.append(store_s / gb)
            loop.run_until_complete(nc.close())
            loop.close()
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)
    if pe.rank != 0:
        return []
    return [
        figure(
            "learner_publish",
            "s/GB",
            runs,
            copies,
            higher=False,
            paired=True,
            write_s_per_gb=writes,
        ),
        figure("learner_publish_upload", "s/GB", stores, higher=False),
    ]


def copy_seconds(directory: Path, shards, to: Path) -> float:
    """Seconds to copy the shards' files from `directory` into a new folder `to` (removed)."""
    started = time.perf_counter()
    to.mkdir()
    for s in shards:
        shutil.copyfile(directory / s.name, to / s.name)
    seconds = time.perf_counter() - started
    shutil.rmtree(to)
    return seconds


if __name__ == "__main__":
    main()
