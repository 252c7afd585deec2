"""Evaluation during training (`[learner.eval]`): every N steps, once version v is published,
an eval job goes through the same actors and rewarders as training (`pipeline.generate`, its
own consumer and window, so the learner's accounting never sees it), and its summary lands in
`metrics.jsonl` as an `eval` line tagged with v.

The eval is pinned to v: v is saved as a model folder (`checkpoint_dir/eval/v<v>/model`, which
the actors must be able to read and may serve: `actor.model_dirs`), every eval task names it,
and the actors sample it with those weights whatever version training has reached (loaded in
place, the architecture being the policy's), then switch back to the learner's policy. The
folder is removed when the eval ends. Its samples are kept in
`checkpoint_dir/eval/v<v>/<bench>.samples.jsonl`; a learner restarted with `--resume` does not
reissue a finished version's eval, and a crash loses the eval lines not yet written (the
samples files stay).
"""

from __future__ import annotations

import asyncio
import shutil
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

    def __init__(self, config: LearnerConfig, pe=None):
        self.config = config
        self.pe = pe
        """The policy engine, whose version v each eval's model folder is written from."""
        self.running: set[asyncio.Task] = set()

    async def after_step(self, step: int, version: int) -> None:
        """Save version `version` as a model folder and start its eval, when `step` is one of
        `every_steps`' (before the next step changes the weights)."""
        settings = self.config.eval
        if not settings.every_steps or not settings.benchmarks or step % settings.every_steps:
            return
        folder = await self.pin(version)
        task = asyncio.create_task(self.evaluate(step, version, folder))
        self.running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("eval job failed", error=repr(task.exception()))

    async def pin(self, version: int) -> Path:
        """The policy as it is now (version `version`) as an HF model folder for the actors."""
        from learner.ranks import collective

        config = self.config
        folder = Path(config.checkpoint_dir) / "eval" / f"v{version}" / "model"
        shutil.rmtree(folder, ignore_errors=True)  # a restarted learner's half-written one
        args = (folder, config.serving_dtype, config.shard_mb, config.model.path)
        await asyncio.to_thread(collective, self.pe, "export", *args)
        return folder.resolve()

    async def evaluate(self, step: int, version: int, folder: Path) -> None:
        """Every benchmark of `[learner.eval]` on `folder` (version `version`), one eval line
        each; the folder is removed at the end."""
        try:
            for name in self.config.eval.benchmarks:
                line = await self.evaluate_one(name, step, version, folder)
                append_line(self.config.metrics_file, line)
                tracking.log_eval(line)  # and to TensorBoard / W&B, where configured
                log.info("eval", **{k: line[k] for k in ("bench", "version", "pass_at_1")})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def evaluate_one(self, name: str, step: int, version: int, folder: Path) -> dict:
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
            folder,
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
            await collect(plan, done, self.config.bus, settings.window, False, embedded=False)
        samples = read_samples(out, settings.k)
        metrics, _ = await asyncio.to_thread(
            evaluate, samples, bench, 1, 30.0, scored_by_rewarders=True
        )
        return {
            "event": "eval",
            "step": step,
            "version": version,  # exactly: every sample came from its folder
            "bench": name,
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
