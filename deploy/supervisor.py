"""A small process supervisor for `aha up`: every part of the loop as its own process.

One log file per part, a part that dies is reported and either restarted (actors,
rewarders: their work is redelivered to the others) or ends the run (the learner), and
`stop()` shuts everything down in order — SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("deploy.supervisor")


@dataclass
class Part:
    """One process of the run."""

    name: str
    """Unique name, also the log file's stem (`actor-0` -> `actor-0.log`)."""
    argv: list[str]
    """Command line."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment on top of the supervisor's."""
    restart: bool = False
    """Restart when it dies (True), or end the run (False)."""
    stop_order: int = 0
    """Lower stops first."""


@dataclass
class Running:
    part: Part
    process: subprocess.Popen
    started_at: float
    restarts: int = 0


@dataclass(frozen=True)
class Exit:
    """A part that exited on its own."""

    name: str
    returncode: int
    restarted: bool
    log_tail: str


class Supervisor:
    """Start parts, watch them, stop them all."""

    def __init__(self, log_dir: str | Path, *, max_restarts: int = 3):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.max_restarts = max_restarts
        self.running: dict[str, Running] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, part: Part, restarts: int = 0) -> None:
        if part.name in self.running and self.running[part.name].process.poll() is None:
            raise RuntimeError(f"part {part.name} is already running")
        with open(self.log_path(part.name), "ab") as out:
            process = subprocess.Popen(
                part.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **part.env},
                # Own session: a Ctrl-C in the terminal reaches the supervisor only, which
                # then stops the parts in order instead of all at once.
                start_new_session=True,
            )
        self.running[part.name] = Running(part, process, time.monotonic(), restarts)
        log.info("part started", part=part.name, pid=process.pid, restarts=restarts)

    def poll(self) -> list[Exit]:
        """Reap parts that exited; restart those that may be. Returns what happened."""
        exits = []
        for name, run in list(self.running.items()):
            code = run.process.poll()
            if code is None:
                continue
            again = run.part.restart and code != 0 and run.restarts < self.max_restarts
            exits.append(Exit(name, code, again, self.tail(name)))
            log.warning("part exited", part=name, returncode=code, restarting=again)
            del self.running[name]
            if again:
                self.start(run.part, run.restarts + 1)
        return exits

    def alive(self, name: str) -> bool:
        run = self.running.get(name)
        return run is not None and run.process.poll() is None

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> dict[str, int]:
        """SIGTERM each part in `stop_order` groups and wait up to `grace_s` for the group;
        SIGKILL what is left. Returns each part's exit code."""
        codes: dict[str, int] = {}
        for order in sorted({r.part.stop_order for r in self.running.values()}):
            group = [r for r in self.running.values() if r.part.stop_order == order]
            for run in group:
                if run.process.poll() is None:
                    run.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for run in group:
                try:
                    run.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("part did not stop in time: killing", part=run.part.name)
                    os.killpg(run.process.pid, signal.SIGKILL)
                    run.process.wait()
                codes[run.part.name] = run.process.returncode
        self.running.clear()
        return codes
