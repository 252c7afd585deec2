"""A small process supervisor for `aha up`: every part of the loop as its own process.

One log file per part, a part that dies is reported and either restarted (actors,
rewarders: their work is redelivered to the others) or ends the run (the learner), and
`stop()` shuts everything down in order — SIGTERM, a grace period, then SIGKILL.

A part is its whole process tree: each starts in its own process group (which vLLM's
EngineCore and workers, forked or spawned by multiprocessing, stay in), and once the part's
own process has exited, whatever is left of its group is killed. Every process of a part
also carries `AHA_PART=<name>@<log dir>` in its environment, so what belongs to a run can
be found in /proc. An embedded NATS server handed to `watch_server` is restarted on the
same ports and store when it dies; clients reconnect by themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from protocol.server import NatsServer

log = structlog.get_logger("deploy.supervisor")

PART_ENV = "AHA_PART"
"""Environment variable set in every process of a part: `<name>@<log dir>`."""
SERVER = "nats"
"""The name an embedded server's exits are reported under."""


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

        self.server: NatsServer | None = None
        self.restarts: dict[str, int] = {}
        """Restarts so far, by part name (the server's under `SERVER`)."""

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def marker(self, name: str) -> str:
        """The `AHA_PART` value of every process of part `name`."""
        return f"{name}@{self.log_dir.resolve()}"

    def start(self, part: Part, restarts: int = 0) -> None:
        if part.name in self.running and self.running[part.name].process.poll() is None:
            raise RuntimeError(f"part {part.name} is already running")
        with open(self.log_path(part.name), "ab") as out:
            process = subprocess.Popen(
                part.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **part.env, PART_ENV: self.marker(part.name)},
                # Own session (and process group, which its children share): a Ctrl-C in the
                # terminal reaches the supervisor only, which then stops the parts in order,
                # and the whole group can be killed once the part is gone.
                start_new_session=True,
                preexec_fn=_term_with_parent if sys.platform == "linux" else None,
            )
        self.running[part.name] = Running(part, process, time.monotonic(), restarts)
        log.info("part started", part=part.name, pid=process.pid, restarts=restarts)

    def watch_server(self, server: NatsServer) -> None:
        """Restart `server` (on its ports and store) whenever it dies, from `poll`."""
        self.server = server

    def poll(self) -> list[Exit]:
        """Reap parts that exited (and what their process group left); restart those that may
        be, and a dead server. Returns what happened."""
        exits = []
        server = self.poll_server()
        if server is not None:
            exits.append(server)
        for name, run in list(self.running.items()):
            code = run.process.poll()
            if code is None:
                continue
            left = kill_group(run.process.pid)
            again = run.part.restart and code != 0 and run.restarts < self.max_restarts
            exits.append(Exit(name, code, again, self.tail(name)))
            log.warning(
                "part exited",
                part=name,
                returncode=code,
                restarting=again,
                processes_left_killed=left,
            )
            del self.running[name]
            if again:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.start(run.part, run.restarts + 1)
        return exits

    def poll_server(self) -> Exit | None:
        """A watched server that died is started again at once on the same ports and store
        (JetStream keeps what it acknowledged; clients reconnect by themselves)."""
        from protocol.server import ServerError

        server = self.server
        if server is None or server.process is None or server.process.poll() is None:
            return None
        code = server.process.returncode
        again = self.restarts.get(SERVER, 0) < self.max_restarts
        log.warning("nats-server exited", returncode=code, restarting=again, url=server.url)
        tail = read_tail(server.log_file)
        if again:
            self.restarts[SERVER] = self.restarts.get(SERVER, 0) + 1
            try:
                server.start()
            except ServerError as e:
                log.error("nats-server could not be restarted", error=str(e))
                again = False
            else:
                log.info("nats-server restarted", url=server.url, restarts=self.restarts[SERVER])
        if not again:
            self.server = None
        return Exit(SERVER, code, again, tail)

    def alive(self, name: str) -> bool:
        run = self.running.get(name)
        return run is not None and run.process.poll() is None

    def tail(self, name: str, lines: int = 20) -> str:
        return read_tail(self.log_path(name), lines)

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
                    kill_group(run.process.pid)
                    run.process.wait()
                left = kill_group(run.process.pid)
                if left:
                    log.warning("part left processes: killed", part=run.part.name, processes=left)
                codes[run.part.name] = run.process.returncode
        self.running.clear()
        return codes


def read_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if it cannot be read)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid` (from /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, wait_s: float = 5.0) -> int:
    """SIGKILL every process left in the group `pgid` and wait (up to `wait_s`) until they
    are gone; returns how many there were. The group's leader must already be gone or about
    to be killed too: the kernel keeps its pid from being reused while the group has members."""
    left = len(group_members(pgid)) if sys.platform == "linux" else 0
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return left
    deadline = time.monotonic() + wait_s
    # SIGKILL takes effect when the process next runs: on a busy machine, a moment later.
    while sys.platform == "linux" and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _term_with_parent() -> None:
    """In a part: SIGTERM when the supervisor dies, so no part outlives `aha up` (parts are
    started from the main thread, which lives as long as the supervisor)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
