"""Bus throughput: aha's publish/consume of real Rollouts next to raw nats-py on the same bytes.

    python benchmarks/bus.py [--messages 200] [--small-messages 1000] [--rounds 11] [--json]

Both sides use the same embedded nats-server, the same work-queue stream and durable consumer
settings, awaited publishes and `fetch(batch)` + ack. The raw side sends bytes encoded
beforehand; the aha side pays for everything a process pays for: `Bus.publish` (msgpack
encode, Nats-Msg-Id) and `StageConsumer.fetch` (decode + pydantic validation of every
sample). Two figures: `bus_rollout` (G=8 x 1,024 tokens, ~100 KiB) and `bus_small` (G=2 x 16
tokens, ~1 KiB), each aha's messages/s over raw's in the same round (the two sides take turns
going first), min/median/max over the rounds. Goal: aha >= 0.9 x raw.

Where aha's extra time goes is printed beside each figure: this process's CPU per message on
each side, and the codec's own parts measured on the same messages away from the bus (encode,
msgpack unpack, pydantic validation; the best of a few passes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script: the repository first (benchmarks/learner.py would shadow `learner`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import add_output_args, figure, report, spread
from protocol.bus import Bus
from protocol.codec import decode, encode, unpack
from protocol.config import BusConfig
from protocol.messages import Rollout, Sample, Task
from protocol.names import ROLLOUTS
from protocol.server import NatsServer
from protocol.stage import StageConsumer


def make_rollouts(n: int, group: int, tokens: int, tag: str = "") -> list[Rollout]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        task = Task(
            task_id=f"bench-{i}{tag}",
            prompt_id=f"p{i}",
            prompt="Solve: " + "x" * 200,
            reference="42",
            rewards={"accuracy_math": 1.0},
            group_size=group,
            issued_version=0,
        )
        samples = [
            Sample(
                token_ids=rng.integers(0, 151_936, tokens).astype(np.int32),
                logprobs=-rng.exponential(size=tokens).astype(np.float32),
                text="word " * (tokens * 4 // 5),  # ~4 characters per token
                finish_reason="length",
            )
            for _ in range(group)
        ]
        out.append(
            Rollout(
                task=task,
                policy_version=0,
                actor_id="bench",
                prompt_token_ids=rng.integers(0, 151_936, 64).astype(np.int32),
                samples=samples,
            )
        )
    return out


async def consume_raw(bus: Bus, n: int, batch: int) -> int:
    sub = await bus.js.pull_subscribe_bind(durable=ROLLOUTS.durable, stream=ROLLOUTS.stream)
    got = 0
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=5)
        except TimeoutError:
            break
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await sub.unsubscribe()
    return got


async def consume_aha(bus: Bus, n: int, batch: int) -> int:
    consumer = StageConsumer(bus, ROLLOUTS)
    got = 0
    while got < n:
        deliveries = await consumer.fetch(batch, timeout=5)
        if not deliveries:
            break
        for d in deliveries:
            await d.ack()
        got += len(deliveries)
    await consumer.close()
    return got


async def measure(args, n: int, group: int, tokens: int) -> dict[str, list[float]]:
    """End-to-end seconds and this process's CPU per message of each side in each round; the
    two sides of a round run back to back, taking turns going first."""
    results: dict[str, list[float]] = {"raw": [], "aha": [], "raw_cpu": [], "aha_cpu": []}
    with NatsServer() as server:
        bus = await Bus.connect(BusConfig(url=server.url), name="bench")
        for round_ in range(args.rounds):
            # Fresh messages each round (distinct task ids, so the duplicate window drops
            # nothing), made before the clock starts and frozen out of the collector's way:
            # they are the benchmark's, not what a stage holds.
            tag = f".{round_}.{group}x{tokens}"
            prepared = {
                name: make_rollouts(n, group, tokens, tag=f".{name}{tag}")
                for name in ("raw", "aha")
            }
            payloads = [encode(r) for r in prepared["raw"]]
            results.setdefault("bytes", [sum(map(len, payloads)) / n])
            gc.collect()
            gc.freeze()
            for name in ("raw", "aha") if round_ % 2 == 0 else ("aha", "raw"):
                await bus.js.purge_stream(ROLLOUTS.stream)
                start, cpu = time.perf_counter(), time.process_time()
                if name == "raw":
                    for r, data in zip(prepared[name], payloads, strict=True):
                        await bus.js.publish(
                            ROLLOUTS.subject, data, headers={"Nats-Msg-Id": r.msg_id}
                        )
                    got = await consume_raw(bus, n, args.batch)
                else:
                    for r in prepared[name]:
                        await bus.publish(ROLLOUTS, r)
                    got = await consume_aha(bus, n, args.batch)
                end = time.perf_counter()
                assert got == n, f"{name}: consumed {got} of {n}"
                results[name].append(end - start)
                results[f"{name}_cpu"].append((time.process_time() - cpu) / n)
            del prepared, payloads
            gc.unfreeze()
        await bus.close()
    return results


def codec_costs(rollouts: list[Rollout], passes: int = 5) -> dict[str, float]:
    """The codec's CPU µs per message, by part: the best of `passes` over `rollouts`."""
    data = [encode(r) for r in rollouts]
    unpacked = [unpack(d, Rollout) for d in data]
    parts = {
        "encode": lambda: [encode(r) for r in rollouts],
        "unpack": lambda: [unpack(d, Rollout) for d in data],
        "validate": lambda: [Rollout.model_validate(o) for o in unpacked],
        "decode": lambda: [decode(d, Rollout) for d in data],
    }
    best = {}
    for name, part in parts.items():
        times = []
        for _ in range(passes):
            start = time.process_time()
            part()
            times.append(time.process_time() - start)
        best[name] = min(times) / len(rollouts) * 1e6
    return best


async def run(args) -> None:
    sizes = {
        "bus_rollout": (args.messages, args.group, args.tokens),
        "bus_small": (args.small_messages, args.small_group, args.small_tokens),
    }
    figures = []
    for name, (n, group, tokens) in sizes.items():
        results = await measure(args, n, group, tokens)
        codec = codec_costs(make_rollouts(min(n, 200), group, tokens, tag=".codec"))
        raw = [n / t for t in results["raw"]]
        aha = [n / t for t in results["aha"]]
        cpu = {k: statistics.median(results[f"{k}_cpu"]) * 1e6 for k in ("raw", "aha")}
        # Each round's ratio is against the raw round beside it.
        f = figure(
            name,
            "messages/s",
            aha,
            raw,
            paired=True,
            best_of_ratio=max(aha) / max(raw),
            client_cpu_us_per_message=cpu,
            codec_cpu_us_per_message=codec,
            message_bytes=results["bytes"][0],
            group=group,
            tokens=tokens,
        )
        figures.append(f)
        if not args.json:
            print(
                f"{name}: {n} Rollouts of G={group} x {tokens} tokens, "
                f"{results['bytes'][0] / 1024:.1f} KiB each; min/median/max of {args.rounds} rounds"
            )
            print(f"  raw nats-py  {spread(raw)} msg/s")
            print(f"  aha          {spread(aha)} msg/s")
            print(f"  aha / raw    {f['ratio']:.3g} (median of the rounds' ratios; goal >= 0.9)")
            print(
                f"  this process's CPU per message (median): raw {cpu['raw']:.0f} us, "
                f"aha {cpu['aha']:.0f} us (the server's is the same for both)"
            )
            print(
                "  aha's codec per message, away from the bus (best of 5): "
                + ", ".join(f"{k} {v:.0f} us" for k, v in codec.items())
            )
    report(figures, args, "bus")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--messages", type=int, default=200, help="messages per round and side, Rollouts"
    )
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument(
        "--small-messages", type=int, default=1000, help="messages per round and side, small ones"
    )
    p.add_argument("--small-group", type=int, default=2, help="G of the small messages")
    p.add_argument("--small-tokens", type=int, default=16, help="tokens of the small messages")
    add_output_args(p)
    import structlog

    # Logs to stderr: stdout carries the figures (one JSON line each with --json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
