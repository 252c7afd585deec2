"""Weight broadcast without a shared volume: learner publish, actor transfer, fan-out, load.

    python benchmarks/weights.py [--gb 1.0] [--shard-mb 256] [--runs 3] [--actors 3] [--json]

A model of `--gb` GB in bf16 (fp32 master weights, a few large tensors) goes the way a real
run sends it, through an embedded nats-server:

- learner side: `write_shards` (gather, cast, write safetensors, sha256) then `publish_weights`
  (upload to the object store, manifest to KV `aha-policy`), as s/GB;
- transfer: an actor's `download_shards` from "manifest seen" (KV get) to every shard verified,
  in GB/s next to a raw file copy of the same bytes (`shutil.copyfile`) in the same run;
- fan-out: `--actors` connections downloading the same version at once (aggregate GB/s), and
  the bytes the learner's connection sent for it, which do not depend on the actor count;
- engine load, separately: reading the verified shards into torch tensors and copying each
  once (`load_file` + a copy: what the HF engine does; vLLM's reload is its own figure);
- before/after in the same run: the previous download path (nats-py `get(writeinto=)`, whose
  own digest check hashes once, then `verify_shard` reading the file back and hashing again),
  with each path's CPU seconds per GB in this process (steadier than wall time on a shared
  machine).

Each figure is min/median/max over `--runs`; `--json` prints one line per figure:
`{"figure", "value", "unit", "baseline", "ratio", "runs"}` (value and baseline: medians).
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

# Run as a script: the repository first (benchmarks/learner.py would shadow `learner`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import add_output_args, figure, report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="model size in GB of bf16 weights")
    p.add_argument("--shard-mb", type=float, default=256.0, help="shard size in MiB")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each figure")
    p.add_argument("--actors", type=int, default=3, help="concurrent downloads in the fan-out")
    add_output_args(p)
    return p.parse_args()


def make_module(gb: float, tensor_mb: float):
    """A module whose parameters are `gb` GB in bf16, in tensors of about `tensor_mb` MiB."""
    import torch

    numel = int(gb * 1e9 / 2)
    per = max(1, int(tensor_mb * 2**20 / 2))
    module = torch.nn.Module()
    for i in range(0, numel, per):
        n = min(per, numel - i)
        module.register_parameter(f"w{i // per}", torch.nn.Parameter(torch.randn(n) * 0.02))
    return module


async def download_with_get(js, manifest, directory: Path) -> None:
    """The download path before: nats-py's `get` into a file, then `verify_shard` re-reading it."""
    from protocol.names import OBJECT_STORE_WEIGHTS
    from protocol.weights import object_name, verify_shard

    directory.mkdir(parents=True, exist_ok=True)
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    for shard in manifest.shards:
        with open(directory / shard.name, "wb") as f:
            await store.get(object_name(manifest.version, shard.name), writeinto=f)
        await asyncio.to_thread(verify_shard, directory / shard.name, shard)


async def run(args) -> list[dict]:
    from safetensors.torch import load_file

    from actors.weights import download_shards
    from learner.weights import publish_weights, write_shards
    from protocol.codec import decode
    from protocol.config import BusConfig
    from protocol.messages import WeightManifest
    from protocol.names import KEY_LATEST, KV_POLICY
    from protocol.server import NatsServer
    from protocol.streams import connect, ensure_streams

    scratch = Path(tempfile.mkdtemp(prefix="aha-bench-weights-"))
    module = make_module(args.gb, tensor_mb=64)
    publish_s, write_s, upload_s, copy_s, transfer_s, load_s, fanout_s = [], [], [], [], [], [], []
    old_s, cpu_new, cpu_old = [], [], []
    sent_per_version: list[int] = []
    received_per_actor: list[int] = []
    total = 0
    try:
        with NatsServer(scratch / "nats") as server:
            config = BusConfig(url=server.url)
            learner = await connect(config)
            js = learner.jetstream()
            await ensure_streams(js, config)
            for run_ in range(args.runs):
                version = run_ + 1
                directory = scratch / f"learner-v{version}"
                # Learner side: gather + cast + write + hash, then upload + manifest.
                start = time.perf_counter()
                shards = write_shards(module, directory, "bfloat16", args.shard_mb)
                written = time.perf_counter()
                sent_before = learner.stats["out_bytes"]
                manifest = await publish_weights(
                    js,
                    directory,
                    shards,
                    version=version,
                    step=version,
                    dtype="bfloat16",
                    keep_versions=2,
                )
                done = time.perf_counter()
                sent_per_version.append(learner.stats["out_bytes"] - sent_before)
                total = manifest.total_bytes
                gb = total / 1e9
                write_s.append((written - start) / gb)
                upload_s.append((done - written) / gb)
                publish_s.append((done - start) / gb)

                # Baseline: a raw copy of the same files, same disk, same moment.
                copy_dir = scratch / "copy"
                copy_dir.mkdir()
                start = time.perf_counter()
                for shard in shards:
                    shutil.copyfile(directory / shard.name, copy_dir / shard.name)
                copy_s.append(gb / (time.perf_counter() - start))
                shutil.rmtree(copy_dir)

                # One actor: manifest seen -> every shard verified.
                actor = await connect(config)
                try:
                    start = time.perf_counter()
                    kv = await actor.jetstream().key_value(KV_POLICY)
                    seen = decode((await kv.get(KEY_LATEST)).value, WeightManifest)
                    cpu = time.process_time()
                    paths = await download_shards(actor.jetstream(), seen, scratch / "actor")
                    transfer_s.append(gb / (time.perf_counter() - start))
                    cpu_new.append((time.process_time() - cpu) / gb)
                    # The previous path, same version, same connection.
                    start, cpu = time.perf_counter(), time.process_time()
                    await download_with_get(actor.jetstream(), seen, scratch / "old")
                    old_s.append(gb / (time.perf_counter() - start))
                    cpu_old.append((time.process_time() - cpu) / gb)
                    shutil.rmtree(scratch / "old")
                finally:
                    await actor.close()
                start = time.perf_counter()
                for path in paths:
                    for tensor in load_file(str(path)).values():
                        tensor.clone()
                load_s.append((time.perf_counter() - start) / gb)
                shutil.rmtree(scratch / "actor")

                # Fan-out: several actors on their own connections, the same version at once.
                actors = [await connect(config) for _ in range(args.actors)]
                try:
                    before = [nc.stats["in_bytes"] for nc in actors]
                    start = time.perf_counter()
                    await asyncio.gather(
                        *(
                            download_shards(nc.jetstream(), manifest, scratch / f"fan{i}")
                            for i, nc in enumerate(actors)
                        )
                    )
                    fanout_s.append(args.actors * gb / (time.perf_counter() - start))
                    received_per_actor += [
                        nc.stats["in_bytes"] - b for nc, b in zip(actors, before, strict=True)
                    ]
                finally:
                    for nc in actors:
                        await nc.close()
                for i in range(args.actors):
                    shutil.rmtree(scratch / f"fan{i}", ignore_errors=True)
                shutil.rmtree(directory)
            await learner.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    figures = [
        figure("weight_transfer", "GB/s", transfer_s, copy_s, higher=True),
        figure("weight_publish", "s/GB", publish_s, [1 / c for c in copy_s], higher=False),
        figure("weight_publish_write", "s/GB", write_s, None, higher=False),
        figure("weight_publish_upload", "s/GB", upload_s, None, higher=False),
        figure("weight_fanout", "GB/s", fanout_s, transfer_s, higher=True),
        figure("weight_engine_load", "s/GB", load_s, None, higher=False),
        figure("weight_transfer_vs_nats_py_get", "GB/s", transfer_s, old_s, higher=True),
        figure("weight_transfer_cpu", "CPU s/GB", cpu_new, cpu_old, higher=False),
    ]
    learner_out = statistics.median(sent_per_version) / total
    actor_in = statistics.median(received_per_actor) / total
    figures.append(
        figure(
            "weight_fanout_bytes",
            "learner bytes out / version bytes",
            [n / total for n in sent_per_version],
            [n / total for n in received_per_actor],
            higher=False,
            actors=args.actors,
        )
    )
    if not args.json:
        print(f"{total / 1e9:.2f} GB of bf16 weights in {len(shards)} shards")
        print(
            f"  learner sent {learner_out:.3f} x the version's bytes; each actor {actor_in:.3f} x"
        )
    report(figures, args, "weights")
    return figures


def main() -> None:
    import structlog

    # Logs to stderr: stdout carries the figures (one JSON line each with --json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
