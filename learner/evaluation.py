"""Evaluation during training (`[learner.eval]`): every N steps, once version v is published,
an eval job goes through the same actors and rewarders as training (`pipeline.generate`, its
own consumer and window, so the learner's accounting never sees it), and its summary lands in
`metrics.jsonl` as an `eval` line tagged with v.

The eval's tasks name no model: actors sample them with the weights they serve, v or newer
by the time a task is picked up (the line says which versions sampled: `versions`). Its
samples are kept in `checkpoint_dir/eval/v<v>/<bench>.samples.jsonl`; a learner restarted
with `--resume` does not reissue a finished version's eval, and a crash loses the eval lines
not yet written (the samples files stay).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from learner import tracking
from learner.config import LearnerConfig
from learner.metrics import append_line

log = structlog.get_logger("learner.evaluation")

SUMMARY_KEYS = (
    "problems",
    "k",
    "pass_at_1",
    "pass_at_1_stderr",
    "pass_at_k",
    "cons_at_k",
    "undecided",
    "truncated",
    "mean_length",
    "reflection_share",
)
"""What an `eval` line of metrics.jsonl carries of `aha eval`'s summary."""


class EvalJobs:
    """The eval jobs this learner started, each an asyncio task."""

    def __init__(self, config: LearnerConfig):
        self.config = config
        self.running: set[asyncio.Task] = set()

    def after_step(self, step: int, version: int) -> None:
        """Start version `version`'s eval when `step` is one of `every_steps`'."""
        settings = self.config.eval
        if not settings.every_steps or not settings.benchmarks or step % settings.every_steps:
            return
        task = asyncio.create_task(self.evaluate(step, version))
        self.running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("eval job failed", error=repr(task.exception()))

    async def evaluate(self, step: int, version: int) -> None:
        """Every benchmark of `[learner.eval]` at `version`, one eval line each."""
        for name in self.config.eval.benchmarks:
            line = await self.evaluate_one(name, step, version)
            append_line(self.config.metrics_file, line)
            tracking.log_eval(line)  # and to TensorBoard / W&B, where configured
            log.info("eval", **{k: line[k] for k in ("bench", "version", "pass_at_1")})

    async def evaluate_one(self, name: str, step: int, version: int) -> dict:
        from pipeline.benchmarks import get_benchmark
        from pipeline.evaluation import evaluate
        from pipeline.generate import Plan, collect
        from pipeline.samples import read_samples
        from protocol.messages import Sampling

        settings, bench = self.config.eval, get_benchmark(name)
        problems = [
            {"id": p.id, "bench": name, "prompt": bench.prompt(p), "reference": p.reference}
            for p in bench.problems()[: settings.limit]
        ]
        out = Path(self.config.checkpoint_dir) / "eval" / f"v{version}" / f"{name}.samples.jsonl"
        sampling = Sampling(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=version,
        )
        plan = Plan.of(
            self.config.model.path,
            problems,
            settings.k,
            sampling,
            bench.rewards,
            out,
            None,
            f"eval-v{version}-{name}",
            16,
        )
        done = plan.check_output(resume=True)  # a restarted learner continues the file
        if len(done) < len(plan.problems):
            await collect(
                plan, done, self.config.bus, settings.window, False, embedded=False, fixed=False
            )
        samples = read_samples(out, settings.k)
        metrics, _ = await asyncio.to_thread(
            evaluate, samples, bench, 1, 30.0, scored_by_rewarders=True
        )
        versions = [s.policy_version for p in samples for s in p.samples]
        return {
            "event": "eval",
            "step": step,
            "version": version,
            "bench": name,
            "versions": [min(versions), max(versions)],
            **{key: metrics[key] for key in SUMMARY_KEYS},
        }

    async def finish(self, wait_s: float | None = None) -> None:
        """Let the running eval jobs end within `wait_s` (default `[learner.eval] wait_s`),
        then cancel what is left."""
        if not self.running:
            return
        wait_s = self.config.eval.wait_s if wait_s is None else wait_s
        _, pending = await asyncio.wait(set(self.running), timeout=wait_s)
        for task in pending:
            task.cancel()
            log.warning("eval job cancelled at the end of training")
        if pending:
            await asyncio.wait(pending)
