"""Weight broadcast without a shared volume: learner publish, actor transfer, fan-out, load.

    python benchmarks/weights.py [--gb 1.0] [--shard-mb 256] [--runs 3] [--actors 3] [--json]

(`--shard-mb`, `--parallel` and `--fanout` default to the learner's and the actors' defaults.)

A model of `--gb` GB in bf16 (fp32 master weights, a few large tensors) goes the way a real
run sends it, through an embedded nats-server and the learner's HTTP weight server:

- `weight_publish`: the learner's side from "step done" to "manifest visible": `write_shards`
  (gather, cast, write safetensors, sha256) then `publish_weights` (HTTP offer, manifest to
  KV), in s/GB, next to a raw file copy of the same bytes; its parts as `weight_publish_write`
  and `weight_publish_offer`; `weight_publish_upload`: the object-store copy (the actors'
  fallback), which the learner uploads after the manifest, in the background
  (`StoreUploads`), timed here from the manifest to the upload's end with nothing else running;
- `weight_transfer`: one actor's `download_shards` over HTTP from "manifest seen" (KV get) to
  every shard verified, in GB/s next to a raw file copy of the same bytes (`shutil.copyfile`)
  in the same run; `weight_transfer_store`: the same from the object store (the fallback);
  `weight_transfer_cpu` and `weight_transfer_store_cpu`: the CPU seconds per GB each path cost
  this process, the first next to the raw copy's; `weight_hash_cpu`: sha256 alone over the
  same bytes, the least any verified transfer costs;
- `weight_transfer_stream`: one shard over one connection (`fetch_shard`: receive, write and
  hash, nothing else), GB/s next to the raw copy, with this process's user and kernel CPU
  seconds per GB of it (server and receiver): where one stream's time goes. It runs after
  the two full transfers of each run, in memory they freed (on a VM, memory not touched
  lately costs the kernel more to write: the first transfer after a publish pays for it);
- `weight_fanout`: `--actors` actors, each with its relay server, fetching the same version at
  once (GB/s in all, against one actor alone), and `weight_fanout_bytes`: the learner's
  outbound bytes for it (HTTP + NATS) per version byte, which do not grow with the actor count;
- `weight_engine_load`, separately: reading the verified shards into torch tensors and copying
  each once (`load_file` + a copy: what the HF engine does; vLLM's reload is its own figure).

Each figure is min/median/max over `--runs` (`benchmarks/figures.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: the repository first (benchmarks/learner.py would shadow `learner`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import add_output_args, figure, report


def parse_args() -> argparse.Namespace:
    from learner.config import LearnerConfig
    from protocol.weight_server import WeightServerConfig

    shard_mb = LearnerConfig.model_fields["shard_mb"].default
    http = WeightServerConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="model size in GB of bf16 weights")
    p.add_argument("--shard-mb", type=float, default=shard_mb, help="shard size in MiB")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each figure")
    p.add_argument("--actors", type=int, default=3, help="concurrent downloads in the fan-out")
    p.add_argument("--parallel", type=int, default=http.parallel, help="shards fetched at once")
    p.add_argument("--fanout", type=int, default=http.fanout, help="actors a server sends to")
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


def copy_rate(directory: Path, shards, scratch: Path) -> tuple[float, float]:
    """GB/s of a raw copy of the version's files (the disk's speed at this moment), and the
    CPU seconds per GB it cost this process."""
    copy_dir = scratch / "copy"
    copy_dir.mkdir()
    cpu = time.process_time()
    start = time.perf_counter()
    for shard in shards:
        shutil.copyfile(directory / shard.name, copy_dir / shard.name)
    seconds = time.perf_counter() - start
    gb = sum(s.bytes for s in shards) / 1e9
    cpu = time.process_time() - cpu
    shutil.rmtree(copy_dir)
    return gb / seconds, cpu / gb


def hash_cpu(directory: Path, shards) -> float:
    """CPU seconds per GB of sha256 alone over the version's files (from the page cache): what
    any verified transfer costs at least, however it moves the bytes."""
    from protocol.weights import sha256_own_file

    cpu = time.process_time()
    for shard in shards:
        sha256_own_file(directory / shard.name)
    return (time.process_time() - cpu) / (sum(s.bytes for s in shards) / 1e9)


async def timed_download(config, manifest, directory: Path, **kwargs) -> float:
    """Seconds from reading `latest` (as an actor sees a new version) to every shard verified
    in `directory` (the caller removes it)."""
    from actors.weights import download_shards
    from protocol.codec import decode
    from protocol.messages import WeightManifest
    from protocol.names import KEY_LATEST, KV_POLICY
    from protocol.streams import connect

    nc = await connect(config)
    try:
        start = time.perf_counter()
        kv = await nc.jetstream().key_value(KV_POLICY)
        seen = decode((await kv.get(KEY_LATEST)).value, WeightManifest)
        assert seen.version == manifest.version
        await download_shards(nc.jetstream(), seen, directory, **kwargs)
        return time.perf_counter() - start
    finally:
        await nc.close()


def one_stream(source: str, shard, path: Path) -> tuple[float, float, float]:
    """GB/s of one shard fetched from `source` over one connection into a new file at `path`
    (removed), and this process's user and kernel CPU seconds per GB meanwhile."""
    import resource

    from protocol.weight_server import fetch_shard

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fetch_shard(f"{source}/{shard.name}", shard, path)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    path.unlink()
    gb = shard.bytes / 1e9
    return (
        gb / seconds,
        (after.ru_utime - before.ru_utime) / gb,
        (after.ru_stime - before.ru_stime) / gb,
    )


def engine_load(paths: list[Path]) -> float:
    from safetensors.torch import load_file

    start = time.perf_counter()
    for path in paths:
        for tensor in load_file(str(path)).values():
            tensor.clone()
    return time.perf_counter() - start


async def run(args) -> list[dict]:
    from actors.weights import download_shards
    from learner.weights import StoreUploads, publish_weights, write_shards
    from protocol.config import BusConfig
    from protocol.server import NatsServer
    from protocol.streams import connect, ensure_streams
    from protocol.weight_server import WeightServer, WeightServerConfig

    scratch = Path(tempfile.mkdtemp(prefix="aha-bench-weights-"))
    module = make_module(args.gb, tensor_mb=64)
    local = WeightServerConfig(host="127.0.0.1", parallel=args.parallel, fanout=args.fanout)
    off = WeightServerConfig(enabled=False)
    m: dict[str, list[float]] = {
        k: []
        for k in "publish write offer upload copy copy_cpu hash_cpu http store http_cpu store_cpu "
        "load fan loadavg stream stream_user stream_sys".split()
    }
    learner_out: list[float] = []
    total = 0
    server = WeightServer(local).start()
    try:
        with NatsServer(scratch / "nats") as nats:
            config = BusConfig(url=nats.url)
            learner = await connect(config)
            js = learner.jetstream()
            await ensure_streams(js, config)
            uploads = StoreUploads(js, keep_versions=2)
            for version in range(1, args.runs + 1):
                directory = scratch / f"learner-v{version}"
                start = time.perf_counter()
                shards = write_shards(module, directory, "bfloat16", args.shard_mb)
                written = time.perf_counter()
                rate, cpu = copy_rate(directory, shards, scratch)
                m["copy"].append(rate)
                m["copy_cpu"].append(cpu)
                m["hash_cpu"].append(hash_cpu(directory, shards))
                m["loadavg"].append(os.getloadavg()[0])
                offered = time.perf_counter()
                manifest = await publish_weights(
                    js,
                    directory,
                    shards,
                    version=version,
                    step=version,
                    dtype="bfloat16",
                    keep_versions=2,
                    server=server,
                    uploads=uploads,
                )
                visible = time.perf_counter()
                assert await uploads.drain(None) and uploads.uploaded[-1] == version
                stored = time.perf_counter()
                total = manifest.total_bytes
                gb = total / 1e9
                m["write"].append((written - start) / gb)
                m["offer"].append((visible - offered) / gb)
                m["publish"].append((written - start + visible - offered) / gb)
                m["upload"].append((stored - visible) / gb)

                for path, http in (("http", local), ("store", off)):
                    cpu = time.process_time()
                    seconds = await timed_download(config, manifest, scratch / "a", http=http)
                    m[path].append(gb / seconds)
                    m[f"{path}_cpu"].append((time.process_time() - cpu) / gb)
                    shutil.rmtree(scratch / "a")
                rate, user, sys_ = await asyncio.to_thread(
                    one_stream, f"{server.url}/v{version}", shards[0], scratch / "stream"
                )
                m["stream"].append(rate)
                m["stream_user"].append(user)
                m["stream_sys"].append(sys_)
                paths = await download_shards(js, manifest, scratch / "load", http=local)
                m["load"].append(engine_load(paths) / gb)
                shutil.rmtree(scratch / "load")

                relays = [WeightServer(local).start() for _ in range(args.actors)]
                sent = server.sent_bytes, learner.stats["out_bytes"]
                start = time.perf_counter()
                await asyncio.gather(
                    *(
                        timed_download(config, manifest, scratch / f"fan{i}", relay=r, http=local)
                        for i, r in enumerate(relays)
                    )
                )
                m["fan"].append(args.actors * gb / (time.perf_counter() - start))
                out = server.sent_bytes - sent[0] + learner.stats["out_bytes"] - sent[1]
                learner_out.append(out / total)
                for i, r in enumerate(relays):  # after all: a relay serves from its folder
                    r.close()
                    shutil.rmtree(scratch / f"fan{i}", ignore_errors=True)
            await learner.close()
    finally:
        server.close()
        shutil.rmtree(scratch, ignore_errors=True)

    load = {"load_runs": m["loadavg"]}  # the 1-minute load average as each run started
    figures = [
        figure(
            "weight_transfer",
            "GB/s",
            m["http"],
            m["copy"],
            paired=True,
            shards=len(shards),
            parallel=args.parallel,
            **load,
        ),
        figure("weight_transfer_store", "GB/s", m["store"], m["copy"], paired=True, **load),
        figure(
            "weight_transfer_stream",
            "GB/s",
            m["stream"],
            m["copy"],
            paired=True,
            shard_bytes=shards[0].bytes,
            user_cpu_s_per_gb=m["stream_user"],
            sys_cpu_s_per_gb=m["stream_sys"],
        ),
        # CPU seconds this process spent per GB (the HTTP side includes the learner's server
        # threads, here in the same process), next to the raw copy's: when the machine's CPU
        # is shared out (other work running), this ratio is what bounds the transfer's.
        figure(
            "weight_transfer_cpu",
            "CPU s/GB",
            m["http_cpu"],
            m["copy_cpu"],
            higher=False,
            paired=True,
        ),
        figure("weight_transfer_store_cpu", "CPU s/GB", m["store_cpu"], higher=False),
        figure("weight_hash_cpu", "CPU s/GB", m["hash_cpu"], m["copy_cpu"], higher=False),
        figure(
            "weight_publish",
            "s/GB",
            m["publish"],
            [1 / c for c in m["copy"]],
            higher=False,
            paired=True,
        ),
        figure("weight_publish_write", "s/GB", m["write"], higher=False),
        figure("weight_publish_offer", "s/GB", m["offer"], higher=False),
        figure("weight_publish_upload", "s/GB", m["upload"], higher=False),
        figure("weight_fanout", "GB/s", m["fan"], m["http"], paired=True, actors=args.actors),
        figure(
            "weight_fanout_bytes",
            "learner bytes out / version bytes",
            learner_out,
            higher=False,
            actors=args.actors,
            fanout=args.fanout,
        ),
        figure("weight_engine_load", "s/GB", m["load"], higher=False),
    ]
    if not args.json:
        print(f"{total / 1e9:.2f} GB of bf16 weights in {len(shards)} shards")
    report(figures, args, "weights")
    return figures


def main() -> None:
    import structlog

    # Logs to stderr: stdout carries the figures (one JSON line each with --json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
