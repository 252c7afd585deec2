"""Run untrusted programs (model-written code) so that they cannot hurt the machine.

Everything here runs as root, and root ignores the process limit, so resource limits alone
contain nothing. A run, with isolation `"namespaces"` (root, Linux, `unshare` and `setpriv`
from util-linux):

    setpriv --pdeathsig KILL            # dies with the verifier that started it
      unshare --net --pid --fork --mount-proc --kill-child
        sh (PID 1 of a new PID namespace, still root)
          mounts an empty size-limited tmpfs over /tmp (and read-only ones over /var/tmp,
          /dev/shm, /run/lock: the other world-writable places), copies the files into
          /tmp/work owned by the sandbox uid, sets the rlimits, then runs
          setpriv --reuid=UID --regid=UID --clear-groups --no-new-privs (no capabilities)
            the program, in /tmp/work, with a minimal environment

What holds:

- **No network**: a new network namespace has only a loopback interface, and it is down, so
  even 127.0.0.1 is unreachable.
- **Nothing outlives the run**: when PID 1 (the `sh`) exits, the kernel kills every process
  left in its PID namespace, double-forked daemons included; when the run is killed at its
  wall time, `unshare` dies, its `--kill-child` kills the `sh`, and the namespace with it; if
  the verifier process itself is killed, `--pdeathsig` starts the same chain.
- **Limits** (`SandboxLimits`): CPU seconds, address space, processes (RLIMIT_NPROC, which
  holds because the program is not root; it counts per uid, so the verifier pool gives each
  worker its own uid), file size, open files, no core dumps, and the wall time.
- **Files**: the program writes only into its tmpfs (size-limited, thrown away with the mount
  namespace); it cannot write where the `nobody` user cannot, and the world-writable places
  are covered. It can *read* what any user can read (world-readable files of the host): do
  not leave secrets in world-readable files on a rewarder machine.
- **Environment**: only `PATH`, `HOME`, `LANG` and `PYTHONDONTWRITEBYTECODE`; `/proc` is the
  namespace's own, so other processes' environments are not visible either.

Where namespaces are not allowed (not root, an unprivileged container without
CAP_SYS_ADMIN), isolation is `"process"`: as root the program still runs as the sandbox uid
with the same rlimits, a minimal environment and a fresh work directory owned by that uid;
it runs in its own session, killed as a whole at the wall time. What no longer holds there:
the network is reachable, a daemon that calls `setsid` can outlive the run (bounded by its
CPU limit), and world-writable directories such as /tmp are writable. When not root, the
program also keeps the caller's uid (and RLIMIT_NPROC counts all that user's processes).
Set `isolation="namespaces"` in `SandboxLimits` to refuse to run untrusted code there.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rewarder.errors import VerifierError

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The only PATH a sandboxed program sees."""


class SandboxError(VerifierError):
    """The sandbox itself failed (could not start, could not isolate): the run says nothing."""


class SandboxLimits(BaseModel):
    """What one run of an untrusted program may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_seconds: float = Field(10.0, gt=0)
    """Wall-clock limit; the whole process tree is killed when it passes."""
    cpu_seconds: int = Field(10, ge=1)
    """CPU time per process (RLIMIT_CPU)."""
    memory_mb: int = Field(1024, ge=64)
    """Address space per process (RLIMIT_AS), in MiB."""
    processes: int = Field(32, ge=1)
    """Processes and threads of the sandbox uid (RLIMIT_NPROC)."""
    file_mb: int = Field(16, ge=1)
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE), in MiB."""
    disk_mb: int = Field(64, ge=1)
    """Size of the work directory's tmpfs (namespaces isolation), in MiB."""
    open_files: int = Field(64, ge=16)
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    output_bytes: int = Field(1 << 20, ge=1)
    """Bytes of stdout and of stderr kept (the rest is read from disk, never into memory)."""
    uid: int = Field(65534, ge=1)
    """Unprivileged uid and gid the program runs as (65534 = nobody)."""
    python: str = "python3"
    """Interpreter for `run_python`, looked up on the sandbox PATH."""
    isolation: Literal["auto", "namespaces", "process"] = "auto"
    """`auto`: namespaces where the kernel allows them, else `process`; `namespaces`: raise `SandboxError` rather than fall back."""


@dataclass(frozen=True)
class RunResult:
    """How an untrusted program ended."""

    returncode: int | None
    """Exit status (128 + n when killed by signal n); None when killed at the wall time."""
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolation: str
    """`"namespaces"` or `"process"` (see the module docstring)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.cache
def isolation() -> str:
    """`"namespaces"` where this process may create network, PID and mount namespaces, else `"process"`."""
    if os.geteuid() != 0:
        reason = "not root"
    elif not (shutil.which("unshare") and shutil.which("setpriv")):
        reason = "util-linux unshare/setpriv not found"
    else:
        probe = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "true"],
            capture_output=True,
            timeout=10,
        )
        if probe.returncode == 0:
            return "namespaces"
        reason = probe.stderr.decode(errors="replace").strip()
    warnings.warn(
        f"rewarder sandbox: no namespaces here ({reason}); untrusted code runs with 'process'"
        " isolation: network reachable, setsid daemons can outlive a run",
        RuntimeWarning,
        stacklevel=2,
    )
    return "process"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "true"],
        capture_output=True,
        timeout=10,
    )
    if probe.returncode == 0:
        return "namespaces"
    warnings.warn(
        "rewarder sandbox: cannot create namespaces here"
        f" ({probe.stderr.decode(errors='replace').strip()}); untrusted code runs with"
        " 'process' isolation: network reachable, setsid daemons can outlive a run",
        RuntimeWarning,
        stacklevel=2,
    )
    return "process"


def _ulimits(limits: SandboxLimits) -> str:
    # dash's ulimit takes one option per call; -f counts 512-byte blocks, -v KiB
    return " && ".join(
        [
            f"ulimit -t {limits.cpu_seconds}",
            f"ulimit -v {limits.memory_mb * 1024}",
            f"ulimit -p {limits.processes}",
            f"ulimit -f {limits.file_mb * 2048}",
            f"ulimit -n {limits.open_files}",
            "ulimit -c 0",
        ]
    )


def _drop(uid: int) -> str:
    return (
        f"setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs"
        " --inh-caps=-all --bounding-set=-all --"
    )


def _namespace_script(limits: SandboxLimits) -> str:
    """PID 1 of the sandbox: runs as root in the new namespaces, cwd = the host's files dir."""
    uid = limits.uid
    return f"""set -e
mount -t tmpfs -o size={limits.disk_mb}m,mode=1777 tmpfs /tmp
for d in /var/tmp /dev/shm /run/lock; do
  if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k tmpfs "$d"; fi
done
mkdir /tmp/work
cp -R . /tmp/work/
chown -R {uid}:{uid} /tmp/work
chmod 700 /tmp/work
: > ../ready
cd /tmp/work
unset OLDPWD
{_ulimits(limits)}
set +e
{_drop(uid)} "$@"
exit $?
"""


def _process_script(limits: SandboxLimits) -> str:
    """The fallback: cwd = the work dir itself."""
    drop = _drop(limits.uid) if os.geteuid() == 0 else ""
    return f"""set -e
: > ../ready
{_ulimits(limits)}
set +e
{drop} "$@"
exit $?
"""


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (`Z`) has already been killed, only not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], deadline: float) -> None:
    """Wait until the namespace's PID 1 is dead, i.e. the kernel has killed the namespace."""
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.005)


def run_program(
    files: dict[str, str | bytes],
    argv: list[str],
    stdin: str | bytes = b"",
    limits: SandboxLimits = SandboxLimits(),
) -> RunResult:
    """Run `argv` on `files` (name -> content, put in its work dir) under `limits`.

    A program that crashes, runs out of time or memory is a result (`ok` False), not an
    error; `SandboxError` means the sandbox itself did not work.
    """
    mode = isolation() if limits.isolation != "process" else "process"
    if mode != "namespaces" and limits.isolation == "namespaces":
        raise SandboxError("namespaces are not available here and isolation='namespaces' is set")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aha-sandbox-") as tmp:
        host = Path(tmp)
        work = host / "work"
        work.mkdir()
        for name, content in files.items():
            path = work / name
            if path.parent != work:
                raise ValueError(f"sandbox file names are plain names, got {name!r}")
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        (host / "stdin").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
        if mode == "namespaces":
            script = _namespace_script(limits)
            home = "/tmp/work"
            prefix = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
        else:
            script = _process_script(limits)
            home = str(work)
            prefix = []
            if os.geteuid() == 0:
                os.chown(host, 0, 0)
                os.chmod(host, 0o711)  # the uid can reach its work dir, not list the rest
                for path in [work, *work.iterdir()]:
                    os.chown(path, limits.uid, limits.uid)
        env = {
            "PATH": SANDBOX_PATH,
            "HOME": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        setpriv = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        cmd = [*setpriv, *prefix, "sh", "-c", script, "sandbox", *argv]
        with (
            open(host / "stdin", "rb") as fin,
            open(host / "stdout", "wb") as fout,
            open(host / "stderr", "wb") as ferr,
        ):
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=env,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise SandboxError(f"could not start the sandbox: {e}") from e
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
                pid1 = _children(proc.pid)
                _kill(proc, mode)
                _wait_gone(pid1, time.monotonic() + 5.0)
            except BaseException:
                _kill(proc, mode)
                raise
            if mode == "process":
                _kill(proc, mode)  # children left in its process group
        if returncode is not None and returncode < 0:
            returncode = 128 - returncode
        if not (host / "ready").exists():
            raise SandboxError(
                f"the sandbox did not start (exit {returncode}): "
                + _read_head(host / "stderr", 2000).strip()
            )
        return RunResult(
            returncode=returncode,
            stdout=_read_head(host / "stdout", limits.output_bytes),
            stderr=_read_head(host / "stderr", limits.output_bytes),
            timed_out=timed_out,
            seconds=time.monotonic() - start,
            isolation=mode,
        )


def _kill(proc: subprocess.Popen, mode: str) -> None:
    if mode == "namespaces":
        proc.kill()  # unshare --kill-child takes PID 1, and the kernel the rest
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_python(
    source: str, stdin: str | bytes = b"", limits: SandboxLimits = SandboxLimits()
) -> RunResult:
    """Run Python `source` as `main.py` in the sandbox (`-I`: no user site, no PYTHON* vars)."""
    return run_program({"main.py": source}, [limits.python, "-I", "main.py"], stdin, limits)
