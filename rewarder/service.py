"""`aha rewarder`: consume rollouts, score every completion, publish the scored rollout.

    AHA_ROLLOUTS ──▶ run_stage ──▶ score_rollout (G completions on N verifier workers)
                 ──▶ aha.scored.<job> (AHA_SCORED; the task's job: `train` is the learner's)

Each score carries the completion's canonical final answer (`extract_answer`, what majority
votes compare) next to its reward; a verifier that could not decide (error, timeout) is
`reward: null` with the reason, never the 0 of a wrong answer.

Every rewarder replica pulls from the one durable consumer, so adding rewarders adds
throughput; a rewarder that dies leaves its leased rollouts to be redelivered to the others.
The stage loop acks a rollout only after its `ScoredRollout` is published. SIGTERM/SIGINT
stop it gracefully once it scores; before that (connecting) they stop it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import structlog
from prometheus_client import Counter, Histogram

from protocol.messages import Rollout, ScoredRollout
from rewarder.config import RewarderConfig
from rewarder.errors import Disqualified
from rewarder.pool import Job, VerifierPool
from rewarder.rewards import final_answer, gsm8k_answer
from rewarder.sandbox import describe

MAX_ANSWER_CHARS = 1000
"""A longer final answer is no answer (the accuracy rewards score it 0 too)."""


def extract_answer(text: str, rewards, task=None) -> str | None:
    """The final answer a completion votes with, as its accuracy reward reads it: GSM8K's
    number as a fraction's text (`7/2`, `72`) under `accuracy_gsm8k`, else the final answer
    (`\\boxed{}` or `<answer>`) with whitespace runs made one space under `accuracy_math`;
    None without one (or for rewards with no answer, such as code)."""
    if "accuracy_gsm8k" in rewards:
        try:
            value = gsm8k_answer(text, task)
        except Disqualified:  # a number too long to be an answer
            return None
        answer = None if value is None else str(value)
    elif "accuracy_math" in rewards:
        answer = " ".join((final_answer(text, task) or "").split()) or None
    else:
        return None
    return answer if answer is None or len(answer) <= MAX_ANSWER_CHARS else None


log = structlog.get_logger("rewarder")

COMPLETIONS = Counter("aha_rewarder_completions_total", "Completions scored (rate = completions/s)")
REWARD = Histogram(
    "aha_rewarder_reward_component",
    "Each reward component's value per completion (mean = _sum / _count)",
    ["component"],
    buckets=(0.0, 0.25, 0.5, 0.75, 1.0),
)
VERIFIER_FAILURES = Counter(
    "aha_rewarder_verifier_failures_total",
    "Verifier failures, by kind: completions left without reward (error, timeout) and worker"
    " deaths (crash; the completion is scored again, a second death is its 0)",
    ["kind"],
)
QUEUE_WAIT = Histogram(
    "aha_rewarder_queue_wait_seconds",
    "From the rollout's publication to its pickup by a rewarder",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
SCORING = Histogram("aha_rewarder_group_seconds", "Wall time to score one rollout's group")
DISQUALIFIED = Counter(
    "aha_rewarder_disqualified_total",
    "Completions scored 0 by a rule, for what they did (stalled a verifier, hedged, hung)",
    ["reward"],
)


async def score_rollout(
    pool: VerifierPool, rollout: Rollout, rewarder_id: str = ""
) -> ScoredRollout:
    """Score all of a rollout's completions in parallel on the pool."""
    task = rollout.task
    queue_wait = max(0.0, time.time() - rollout.timings.finished_at)
    QUEUE_WAIT.observe(queue_wait)
    start = time.monotonic()
    jobs = [Job(sample.text, task.reference, task.rewards, task) for sample in rollout.samples]
    timeouts, crashes = pool.stats.timeouts, pool.stats.crashes
    scores = await pool.score_async(jobs)
    scores = [
        score.model_copy(update={"answer": extract_answer(sample.text, task.rewards, task)})
        for score, sample in zip(scores, rollout.samples, strict=True)
    ]
    seconds = time.monotonic() - start

    failed = [s for s in scores if s.reward is None]
    new_timeouts = pool.stats.timeouts - timeouts
    new_crashes = pool.stats.crashes - crashes
    VERIFIER_FAILURES.labels("timeout").inc(new_timeouts)
    VERIFIER_FAILURES.labels("crash").inc(new_crashes)
    # a crash is scored again (a second one is the completion's 0): it is no failed score
    VERIFIER_FAILURES.labels("error").inc(max(0, len(failed) - new_timeouts))
    COMPLETIONS.inc(len(scores))
    disqualified = [s.note for s in scores if s.note]
    for note in disqualified:  # `name: reason; name: reason`
        for part in note.split("; "):
            DISQUALIFIED.labels(part.split(":", 1)[0]).inc()
    SCORING.observe(seconds)
    components = defaultdict(list)
    for score in scores:
        for name, value in score.components.items():
            if value is not None:
                REWARD.labels(name).observe(value)
                components[name].append(value)
    rewards = [s.reward for s in scores if s.reward is not None]
    log.info(
        "scored group",
        task_id=task.task_id,
        job=task.job,
        policy_version=rollout.policy_version,
        completions=len(scores),
        reward_mean=round(sum(rewards) / len(rewards), 4) if rewards else None,
        components={k: round(sum(v) / len(v), 4) for k, v in components.items()},
        no_reward=len(failed),
        errors=sorted({s.error for s in failed})[:3],
        disqualified=len(disqualified),
        notes=sorted(set(disqualified))[:3],
        seconds=round(seconds, 3),
        queue_wait_s=round(queue_wait, 3),
    )
    return ScoredRollout(
        rollout=rollout, scores=scores, rewarder_id=rewarder_id, scoring_seconds=seconds
    )


async def run(
    config: RewarderConfig, stop: asyncio.Event | None = None, max_messages: int | None = None
) -> int:
    """Connect, start the verifier pool, score rollouts until `stop` (SIGTERM/SIGINT), drain."""
    from protocol.bus import Bus
    from protocol.names import ROLLOUTS, scored_stage
    from protocol.stage import run_stage, stop_on_signals, watch_max_deliveries

    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)
    stop = stop_on_signals(stop)
    can_run_code, sandbox = describe(config.sandbox)
    (log.info if can_run_code else log.warning)("code sandbox", how=sandbox)
    pool = VerifierPool(config.workers, config.timeout_s, config.sandbox, plugins=config.plugins)
    try:
        bus = await Bus.connect(config.bus, name=f"aha-rewarder-{config.rewarder_id}")
    except BaseException:  # stopped (or failed) while connecting: the workers go too
        pool.close()
        raise
    try:

        async def handle(rollout: Rollout) -> None:
            # Published here, to its job's subject, before the stage loop acks the rollout.
            scored = await score_rollout(pool, rollout, config.rewarder_id)
            await bus.publish(scored_stage(scored.job), scored)

        # Rollouts the server gave up redelivering (a rewarder died on them every time).
        advisories = await watch_max_deliveries(bus, ROLLOUTS)
        stats = await run_stage(
            bus,
            ROLLOUTS,
            handle,
            stop=stop,
            concurrency=config.concurrency,
            max_messages=max_messages,
        )
        await advisories.unsubscribe()
        log.info(
            "rewarder stopped", handled=stats.handled, failed=stats.failed, released=stats.released
        )
    finally:
        await bus.close()
        pool.close()
    return 0


def main(args) -> int:
    """The `aha rewarder` command: logging, config, then the loop."""
    from protocol.config import config_from_args
    from protocol.log import setup_logging

    flags = {"workers": args.workers, "metrics_port": args.metrics_port, "bus.url": args.nats_url}
    config = config_from_args(RewarderConfig, args, "rewarder", flags)
    setup_logging("rewarder", rewarder_id=config.rewarder_id)
    from protocol.stage import Stopped

    try:
        return asyncio.run(run(config))
    except Stopped as e:
        log.info("rewarder stopped before its first rollout", signal=e.signal)
        return 0
