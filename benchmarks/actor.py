"""Actor throughput through NATS next to the bare engine, and the weight hot-swap time per GB.

    .venv/bin/python benchmarks/actor.py [--engine vllm|hf] [--model tiny|big] [--prompts 32]
        [--group 8] [--tokens 64] [--rounds 3] [--swaps 3] [--skip-throughput] [--skip-swap]
        [--json] [--out FILE]

Figures (`benchmarks/figures.py`): `actor_tokens` (tokens/s through NATS, baseline the engine
alone in the round beside it) and `actor_hot_swap_<source>` (s/GB from manifest to served).
Progress lines go to stderr, the figures to stdout.

1. Throughput (goal: through NATS >= 0.95 x direct). One engine serves both sides, in the
   same run, on the same prompts with the same per-prompt seeds:
   - direct: `engine.generate(prompt, sampling, G)` for every prompt, `--concurrency` at once;
   - NATS: the tasks are in `aha.tasks` before the clock starts (the learner keeps them
     queued ahead); the actor's stage loop (`run_stage` over `Actor.rollout`, what `aha
     actor` runs) turns them into rollouts while a consumer in the same process fetches,
     decodes and acks every rollout; the clock stops at the last one consumed.
   Sides are interleaved (direct, NATS, NATS, direct, ...); each NATS round is compared with
   the direct round beside it, and the best rounds are compared too: the machine is shared,
   and the best round is the one least disturbed. The CPU
   each side cost (this process, nats-server, vLLM's engine processes) is printed too: on a
   saturated machine, the actor's per-task CPU is what the engine loses.
2. Hot swap: a random Qwen2 of ~150 MB fp32 (`--big-*`), perturbed and published by
   `learner.weights.publish_weights` as a new version, through the object store and through
   a shared volume. The clock runs from the moment the manifest is visible under `latest`
   (the server's timestamp of the KV put) until the engine serves the new version (the
   actor's own `follow_weights`: fetch, sha256, load); seconds per GB of weights.
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

from actors.config import ActorConfig
from actors.service import Actor, setup_actor_engine
from benchmarks.figures import add_output_args, figure, report
from pipeline.tiny_model import TinySpec, save_tiny_model
from protocol.bus import Bus
from protocol.codec import decode
from protocol.config import BusConfig
from protocol.log import setup_logging
from protocol.messages import Sampling, Task, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, ROLLOUTS, TASKS
from protocol.server import NatsServer
from protocol.stage import StageConsumer, run_stage


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) of this process, its nats-server, and the rest of its
    descendants (vLLM's engine core and worker), from /proc."""
    parents, names, cpu = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        pid = int(entry.name)
        parents[pid], names[pid] = int(fields[1]), name
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    out = {"bench": cpu.get(me, 0.0), "nats-server": 0.0, "engine": 0.0}
    for pid, seconds in cpu.items():
        up = parents.get(pid)
        while up not in (None, 0, 1, me):
            up = parents.get(up)
        if up == me:
            out["nats-server" if names[pid].startswith("nats-server") else "engine"] += seconds
    return out


def big_spec(args) -> TinySpec:
    """A random Qwen2 of `--big-*` size (heads of 64), with the tiny model's tokenizer."""
    heads = args.big_hidden // 64
    return TinySpec(
        hidden_size=args.big_hidden,
        num_layers=args.big_layers,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=args.big_intermediate,
    )


# --- 1. throughput -------------------------------------------------------------------------


def make_tasks(n: int, group: int, tokens: int, tag: str) -> list[Task]:
    return [
        Task(
            task_id=f"bench-{tag}-{i}",
            prompt_id=f"p{i}",
            prompt=f"Q:{100 + 7 * i}+{300 + 11 * i}=",
            reference="0",
            rewards={"accuracy_math": 1.0},
            group_size=group,
            sampling=Sampling(temperature=1.0, max_tokens=tokens, seed=i),
            issued_version=0,
        )
        for i in range(n)
    ]


async def direct(engine, tokenizer, tasks: list[Task], concurrency: int) -> tuple[int, float]:
    """(completion tokens, seconds) of the engine called directly on the tasks' prompts."""
    prompts = [tokenizer(t.prompt)["input_ids"] for t in tasks]
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt, task: Task) -> int:
        async with slots:
            return (await engine.generate(prompt, task.sampling, task.group_size)).num_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, tasks, strict=True)))
    return sum(tokens), time.perf_counter() - started


async def through_nats(actor: Actor, bus: Bus, tasks: list[Task]) -> tuple[int, float]:
    """(completion tokens, seconds) from the first task fetched to the last rollout consumed."""
    for task in tasks:
        await bus.publish(TASKS, task)

    async def consume() -> int:
        consumer = StageConsumer(bus, ROLLOUTS)
        got = tokens = 0
        while got < len(tasks):
            for d in await consumer.fetch(len(tasks) - got, timeout=1.0):
                tokens += sum(len(s.token_ids) for s in d.message.samples)
                await d.ack()
                got += 1
        await consumer.close()
        return tokens

    started = time.perf_counter()
    consumer = asyncio.create_task(consume())
    stats = await run_stage(
        bus,
        TASKS,
        actor.rollout,
        output=ROLLOUTS,
        stop=asyncio.Event(),
        concurrency=actor.config.concurrency,
        max_messages=len(tasks),
    )
    tokens = await consumer
    seconds = time.perf_counter() - started
    assert stats.handled == len(tasks), stats
    return tokens, seconds


async def start_engine(args, config: ActorConfig):
    """`aha actor`'s engine; the HF engine on `--device` (the product's HF actor runs on CPU)."""
    if args.engine == "hf" and args.device != "cpu":
        from actors.hf_engine import HfEngine

        return HfEngine(config.model, dtype=config.dtype, device=args.device)
    return await setup_actor_engine(config)


def say(*parts, **kwargs) -> None:
    """Progress and detail to stderr: stdout carries the figures."""
    print(*parts, file=sys.stderr, **kwargs)


async def throughput(args, workdir: Path, bus: Bus) -> dict:
    from transformers import AutoTokenizer

    spec = TinySpec() if args.model == "tiny" else big_spec(args)
    model = save_tiny_model(workdir / args.model, spec)
    config = ActorConfig(
        model=str(model),
        backend=args.engine,
        enforce_eager=True,
        max_model_len=256,
        concurrency=args.concurrency,
        actor_id="bench",
    )
    engine = await start_engine(args, config)
    tokenizer = AutoTokenizer.from_pretrained(model)
    actor = Actor(config, engine, tokenizer, bus)
    try:
        # Warm-up, unmeasured: the engine's first batches, the consumers' first fetches.
        await direct(engine, tokenizer, make_tasks(args.prompts, args.group, args.tokens, "w"), 64)
        await through_nats(actor, bus, make_tasks(8, args.group, args.tokens, "w"))
        rows = {"direct": [], "nats": []}
        cpus: dict[str, list[dict[str, float]]] = {"direct": [], "nats": []}
        for r in range(args.rounds):
            order = ["direct", "nats"] if r % 2 == 0 else ["nats", "direct"]
            for side in order:
                tasks = make_tasks(args.prompts, args.group, args.tokens, f"{side}{r}")
                cpu = cpu_by_process()
                if side == "direct":
                    tokens, seconds = await direct(engine, tokenizer, tasks, args.concurrency)
                else:
                    tokens, seconds = await through_nats(actor, bus, tasks)
                cpu = {k: v - cpu[k] for k, v in cpu_by_process().items()}
                rows[side].append(tokens / seconds)
                cpus[side].append(cpu)
                say(
                    f"  round {r} {side:6s} {tokens:6d} tokens {seconds:6.2f} s "
                    f"{tokens / seconds:8.0f} tokens/s   CPU s: "
                    + " ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                    + f"   load {load_average()}",
                    flush=True,
                )
        best = {side: max(v) for side, v in rows.items()}
        per_round = [n / d for n, d in zip(rows["nats"], rows["direct"], strict=True)]
        say(
            f"throughput ({args.engine}, {args.model} model, {args.prompts} prompts x G={args.group} x "
            f"<={args.tokens} tokens, concurrency {args.concurrency}):"
        )
        say(f"  direct       best {best['direct']:8.0f} tokens/s")
        say(f"  through NATS best {best['nats']:8.0f} tokens/s")
        say(f"  ratio (best/best) {best['nats'] / best['direct']:.3f}   goal >= 0.95")
        say(f"  ratio per round   {' '.join(f'{x:.3f}' for x in per_round)}", flush=True)
        for name in ("bench", "nats-server", "engine"):
            extra = sum(c[name] for c in cpus["nats"]) - sum(c[name] for c in cpus["direct"])
            per_task = 1000 * extra / (args.rounds * args.prompts)
            say(f"  CPU through NATS minus direct, {name:11s} {per_task:+6.2f} ms per task")
        return figure(
            "actor_tokens",
            "tokens/s",
            rows["nats"],
            rows["direct"],
            paired=True,
            best_of_ratio=best["nats"] / best["direct"],
            engine=args.engine,
            model=args.model,
        )
    finally:
        actor.close()
        await engine.close()


# --- 2. hot swap ---------------------------------------------------------------------------


async def hot_swap(args, workdir: Path, bus: Bus) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from learner.weights import publish_weights, version_dir, write_shards

    folder = save_tiny_model(workdir / "big", big_spec(args))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = ActorConfig(
        model=str(folder),
        backend=args.engine,
        enforce_eager=True,
        max_model_len=256,
        actor_id="bench",
    )
    engine = await start_engine(args, config)
    actor = Actor(config, engine, None, bus)
    kv = await bus.js.key_value(KV_POLICY)
    seen: dict[int, float] = {}

    async def stopwatch() -> None:
        watcher = await kv.watch(KEY_LATEST)
        async for entry in watcher:
            if entry is not None and entry.value:
                # The server's time of the put: this loop may be busy when the entry arrives.
                version = decode(entry.value, WeightManifest).version
                seen.setdefault(version, entry.created.timestamp())

    clock = asyncio.create_task(stopwatch())
    follower = asyncio.create_task(actor.follow_weights(kv))
    shared_root = workdir / "shared"
    results: dict[str, list[float]] = {"store": [], "shared": []}
    total_bytes = 0
    try:
        version = 0
        for _ in range(args.swaps):
            for source in ("store", "shared"):
                version += 1
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3 * torch.randn_like(p))
                directory, shared = version_dir(
                    str(shared_root) if source == "shared" else None, version
                )
                shards = write_shards(model, directory, "float32", shard_mb=50, shared=shared)
                manifest = await publish_weights(
                    bus.js,
                    directory,
                    shards,
                    version=version,
                    step=version,
                    dtype="float32",
                    keep_versions=2,
                )
                while engine.version != version or version not in seen:
                    await asyncio.sleep(0.002)
                seconds = time.time() - seen[version]
                total_bytes = manifest.total_bytes
                results[source].append(seconds)
                say(
                    f"  swap v{version} via {source:6s} {manifest.total_bytes / 1e6:6.1f} MB "
                    f"in {len(shards)} shards: {seconds:6.2f} s from manifest to served   "
                    f"load {load_average()}",
                    flush=True,
                )
                if not shared:
                    shutil.rmtree(directory, ignore_errors=True)
        gb = total_bytes / 1e9
        say(f"hot swap ({args.engine}, {total_bytes / 1e6:.1f} MB fp32 weights):")
        for source, times in results.items():
            say(
                f"  {source:6s} best {min(times):6.2f} s = {min(times) / gb:6.2f} s/GB "
                f"(all: {' '.join(f'{t:.2f}' for t in times)})"
            )
        return [
            figure(f"actor_hot_swap_{source}", "s/GB", [t / gb for t in times], higher=False)
            for source, times in results.items()
        ]
    finally:
        for task in (follower, clock):
            task.cancel()
        await asyncio.gather(follower, clock, return_exceptions=True)
        actor.close()
        await engine.close()


async def amain(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="aha-bench-actor-"))
    say(f"cores {os.cpu_count()}, load average at start {load_average()}", flush=True)
    try:
        with NatsServer(workdir / "nats") as server:
            bus = await Bus.connect(BusConfig(url=server.url), name="bench")
            figures = []
            try:
                if not args.skip_throughput:
                    figures.append(await throughput(args, workdir, bus))
                if not args.skip_swap:
                    figures += await hot_swap(args, workdir, bus)
            finally:
                await bus.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(figures, args, f"actor-{args.engine}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--device", default="cpu", help="the HF engine's device (cuda on a GPU)")
    p.add_argument(
        "--model",
        choices=["tiny", "big"],
        default="tiny",
        help="throughput on the tiny model (overhead worst case) or the --big-* one",
    )
    p.add_argument("--prompts", type=int, default=32, help="tasks per round")
    p.add_argument("--group", type=int, default=8, help="G, completions per task")
    p.add_argument("--tokens", type=int, default=64, help="max tokens per completion")
    p.add_argument("--concurrency", type=int, default=32, help="tasks in the engine at once")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (interleaved)")
    p.add_argument("--swaps", type=int, default=3, help="versions per weight source")
    p.add_argument("--big-hidden", type=int, default=512, help="--model big and the hot swap")
    p.add_argument("--big-layers", type=int, default=12)
    p.add_argument("--big-intermediate", type=int, default=1408)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-swap", action="store_true")
    add_output_args(p)
    args = p.parse_args()
    setup_logging("bench", level="warning")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
