"""Bus throughput: aha's publish/consume of real Rollouts next to raw nats-py on the same bytes.

    python benchmarks/bus.py [--messages 400] [--group 8] [--tokens 1024]

Both sides use the same embedded nats-server, the same work-queue stream and durable consumer
settings, awaited publishes and `fetch(batch)` + ack. The raw side sends bytes encoded
beforehand; the aha side pays for everything a process pays for: `Bus.publish` (msgpack
encode, Nats-Msg-Id) and `StageConsumer.fetch` (decode + pydantic validation of every
sample). Goal: aha >= 0.8 x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from protocol.bus import Bus
from protocol.codec import encode
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
        except asyncio.TimeoutError:
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


async def run(args) -> None:
    # Distinct task ids per round and side, so the duplicate window drops nothing.
    rounds = {
        (name, i): make_rollouts(args.messages, args.group, args.tokens, tag=f".{name}{i}")
        for name in ("raw", "aha")
        for i in range(args.rounds)
    }
    payloads = {key: [encode(r) for r in rs] for key, rs in rounds.items() if key[0] == "raw"}
    size = sum(len(p) for p in payloads["raw", 0])
    print(
        f"{args.messages} Rollouts of G={args.group} x {args.tokens} tokens, "
        f"{size / args.messages / 1024:.0f} KiB each ({size / 1e6:.1f} MB in all)"
    )
    with NatsServer() as server:
        bus = await Bus.connect(BusConfig(url=server.url), name="bench")
        results = {}
        for round_ in range(args.rounds):
            for name in ("raw", "aha"):
                await bus.js.purge_stream(ROLLOUTS.stream)
                start = time.perf_counter()
                if name == "raw":
                    for r, data in zip(rounds[name, round_], payloads[name, round_]):
                        await bus.js.publish(
                            ROLLOUTS.subject, data, headers={"Nats-Msg-Id": r.msg_id}
                        )
                    published = time.perf_counter()
                    got = await consume_raw(bus, args.messages, args.batch)
                else:
                    for r in rounds[name, round_]:
                        await bus.publish(ROLLOUTS, r)
                    published = time.perf_counter()
                    got = await consume_aha(bus, args.messages, args.batch)
                end = time.perf_counter()
                assert got == args.messages, f"{name}: consumed {got} of {args.messages}"
                results.setdefault(name, []).append(
                    (published - start, end - published, end - start)
                )
        await bus.close()

    def best(name: str, i: int) -> float:
        return min(r[i] for r in results[name])

    print(f"{'':>4} {'publish msg/s':>14} {'consume msg/s':>14} {'end-to-end msg/s':>17} {'MB/s':>6}")
    for name in ("raw", "aha"):
        pub, con, total = best(name, 0), best(name, 1), best(name, 2)
        print(
            f"{name:>4} {args.messages / pub:>14.0f} {args.messages / con:>14.0f} "
            f"{args.messages / total:>17.0f} {size / total / 1e6:>6.1f}"
        )
    ratio = best("raw", 2) / best("aha", 2)
    print(f"aha / raw end-to-end throughput: {ratio:.2f} (goal >= 0.80; best of {args.rounds} rounds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
