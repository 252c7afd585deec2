"""Run untrusted programs (model-written code) so that they cannot hurt the machine, nor lie.

Everything here runs as root, and root ignores the process limit, so resource limits alone
contain nothing. A run, with isolation `"namespaces"` (root, Linux, `unshare`, `setpriv` and
`chroot` from util-linux / coreutils):

    setpriv --pdeathsig KILL            # dies with the verifier that started it
      unshare --net --pid --fork --mount-proc --kill-child
        sh (PID 1 of a new PID namespace, still root; joins the run's memory cgroup)
          mounts an empty tmpfs over /tmp (size and inode limits), builds a minimal root in
          it: /usr, /bin, /lib* bound read-only, five /etc files, /dev/{null,zero,full,
          random,urandom}, a fresh /proc, a private /tmp; copies the files into /work owned
          by the sandbox uid; sets the rlimits; then
          chroot ROOT sh -c 'cd /work && exec setpriv --reuid=UID ... --no-new-privs PROGRAM'

With a `Checker` (how `code_tests` runs HumanEval-style tests), a second program runs beside
the first as a *different* uid, in a directory the first cannot read: the two talk only
through two pipes (the program's fds 3 and 4), and the checker alone holds fd 5, the
verdict. The candidate cannot signal, trace or read the checker (another uid, no
capabilities), nor reach the verdict (no fd, no path to it).

What holds:

- **No network**: a new network namespace has only a loopback interface, and it is down, so
  even 127.0.0.1 is unreachable; abstract unix sockets are per network namespace.
- **The host's files are out of sight**: the program sees only the system's executables and
  libraries (read-only), not /home, /root, /srv, /run, /var, the project or its data, nor a
  host unix socket; every Python `site-packages` / `dist-packages` under /usr is an empty
  mount (an image may install aha, its benchmarks and their answers there). In a chroot the kernel also refuses new user namespaces (`unshare -U`).
- **Nothing outlives the run**: when PID 1 (the `sh`) exits, the kernel kills every process
  left in its PID namespace, double-forked daemons included; when the run is killed at its
  wall time, `unshare` dies, its `--kill-child` kills the `sh`, and the namespace with it; if
  the verifier process itself is killed, `--pdeathsig` starts the same chain.
- **Limits** (`SandboxConfig`): CPU seconds, address space, processes (RLIMIT_NPROC, which
  holds because the program is not root; it counts per uid, so the verifier pool gives each
  worker its own uids), file size, open files, no core dumps, the wall time; the disk and
  its inodes (the tmpfs); all processes' memory together (a memory cgroup, v2 or v1, where
  this process may create one: `memory_cgroup()` says).
- **Environment**: only `PATH`, `HOME`, `LANG` and `PYTHONDONTWRITEBYTECODE`; `/proc` is the
  namespace's own, so other processes' environments are not visible either.
- **Stdin** is a pipe: what was read cannot be read again.

Where namespaces are not allowed (an unprivileged container without CAP_SYS_ADMIN),
isolation is `"process"`: as root the program still runs as the sandbox uid (the checker as
its own) with the same rlimits, a minimal environment and a fresh work directory owned by
that uid, in its own session, and in the memory cgroup where there is one, every process of
which is killed at the end. What no longer holds there: the network is reachable, the host's
world-readable files are readable, world-writable directories such as /tmp are writable, and
without a cgroup a daemon that calls `setsid` can outlive the run (bounded by its CPU limit).
When not root the program would run as the rewarder's own user, able to read the rewarder's
memory and environment (its NATS password): `run_program` refuses that unless
`allow_own_user` is set. Set `isolation="namespaces"` to refuse anything but the full sandbox.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from protocol.config import CONFIG
from rewarder.errors import VerifierError

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The only PATH a sandboxed program sees."""
ROOT_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Host directories (or their symlinks) in the sandbox's root, read-only."""
ROOT_ETC = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "localtime")
"""The only host /etc files in the sandbox's root, read-only."""
ROOT_DEV = ("null", "zero", "full", "random", "urandom")
SECCOMP = Path(__file__).parent / "harness" / "seccomp.py"
"""Installs the program's seccomp filter, then execs it (see that file)."""


class SandboxError(VerifierError):
    """The sandbox itself failed (could not start, could not isolate): the run says nothing."""


class SandboxConfig(BaseModel):
    """What one run of an untrusted program may use."""

    model_config = CONFIG

    wall_seconds: float = Field(10.0, gt=0)
    """Wall-clock limit; the whole process tree is killed when it passes."""
    cpu_seconds: int = Field(10, ge=1)
    """CPU time per process (RLIMIT_CPU)."""
    memory_mb: int = Field(1024, ge=64)
    """Address space per process (RLIMIT_AS), in MiB."""
    memory_total_mb: int = Field(2048, ge=64)
    """Memory of all the run's processes together (a memory cgroup, where one can be made), in MiB."""
    processes: int = Field(32, ge=1)
    """Processes and threads of the sandbox uid (RLIMIT_NPROC)."""
    file_mb: int = Field(16, ge=1)
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE), in MiB."""
    disk_mb: int = Field(64, ge=1)
    """Size of the sandbox's tmpfs (namespaces isolation), in MiB."""
    files: int = Field(4096, ge=256)
    """Inodes of the sandbox's tmpfs (namespaces isolation): files and directories it may create."""
    open_files: int = Field(64, ge=16)
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    output_bytes: int = Field(1 << 20, ge=1)
    """Bytes of stdout and of stderr kept (the rest is read from disk, never into memory)."""
    uid: int = Field(65534, ge=1)
    """Unprivileged uid and gid the program runs as (65534 = nobody)."""
    checker_uid: int = Field(64534, ge=1)
    """Unprivileged uid and gid of a `Checker` beside the program; never the program's."""
    python: str = "python3"
    """Interpreter for `run_python`, looked up on the sandbox PATH."""
    isolation: Literal["auto", "namespaces", "process"] = "auto"
    """`auto`: namespaces where the kernel allows them, else `process`; `namespaces`: raise `SandboxError` rather than fall back."""
    allow_own_user: bool = False
    """Not root: run untrusted code as the rewarder's own user anyway (it can then read the rewarder's memory, environment and files)."""


@dataclass(frozen=True)
class Checker:
    """A trusted program run beside the untrusted one, as another uid (see the module doc).

    It writes requests on fd 3 and reads replies on fd 4 (the program reads fd 3 and writes
    fd 4), and its verdict on fd 5. Its stdout and stderr are the run's; the program's
    stdout goes to the run's stderr and its stdin is empty.
    """

    files: dict[str, str | bytes]
    argv: list[str]


@dataclass(frozen=True)
class RunResult:
    """How an untrusted program ended."""

    returncode: int | None
    """Exit status (128 + n when killed by signal n); None when killed at the wall time.
    With a `Checker`, the checker's."""
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolation: str
    """`"namespaces"` or `"process"` (see the module docstring)."""
    verdict: str | None = field(default=None)
    """What a `Checker` wrote on fd 5 (None without one)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.cache
def isolation() -> str:
    """`"namespaces"` where this process may create network, PID and mount namespaces, else `"process"`."""
    if os.geteuid() != 0:
        reason = "not root"
    elif not all(shutil.which(tool) for tool in ("unshare", "setpriv", "chroot")):
        reason = "util-linux unshare/setpriv or chroot not found"
    else:
        probe = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "true"],
            capture_output=True,
            timeout=10,
        )
        if probe.returncode == 0:
            return "namespaces"
        reason = probe.stderr.decode(errors="replace").strip()
    _warn(
        f"rewarder sandbox: no namespaces here ({reason}); untrusted code runs with 'process'"
        " isolation: network and host files reachable"
    )
    return "process"


def describe(limits: SandboxConfig) -> tuple[bool, str]:
    """(whether `code_tests` can run here, one line saying how): what a rewarder logs at start."""
    if os.geteuid() != 0 and not limits.allow_own_user:
        return False, (
            "not root and sandbox.allow_own_user is false: code_tests gives no reward (run the"
            " rewarder as root with the sandbox's capabilities, or allow running untrusted code"
            " as the rewarder's own user)"
        )
    mode = isolation() if limits.isolation != "process" else "process"
    if mode != "namespaces" and limits.isolation == "namespaces":
        return False, "isolation='namespaces' is set and namespaces are not available here"
    cgroup = memory_cgroup()
    parts = [
        mode,
        "chroot" if mode == "namespaces" else "host files visible",
        "seccomp" if os.uname().machine in ("x86_64", "aarch64") else "no seccomp filter",
        f"memory cgroup {cgroup[0]}" if cgroup else "no memory cgroup (memory per process only)",
        "program and checker as uids" if os.geteuid() == 0 else "as the rewarder's own user",
    ]
    return True, ", ".join(parts)


# --- the memory cgroup ---------------------------------------------------------------------


@functools.cache
def memory_cgroup() -> tuple[str, Path] | None:
    """`("v2" | "v1", parent)`: where a run's memory cgroup can be made; None where it cannot."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path.lstrip("/")
    candidates = []
    if "" in own:  # v2: memory must be delegated to our cgroup's children
        parent = Path("/sys/fs/cgroup") / own[""]
        control = parent / "cgroup.subtree_control"
        if control.exists():
            candidates.append(("v2", parent))
    if "memory" in own:
        candidates.append(("v1", Path("/sys/fs/cgroup/memory") / own["memory"]))
    for version, parent in candidates:
        probe = parent / f"aha-probe-{os.getpid()}"
        try:
            if version == "v2" and "memory" not in (parent / "cgroup.subtree_control").read_text():
                (parent / "cgroup.subtree_control").write_text("+memory")
            probe.mkdir()
            limit = "memory.max" if version == "v2" else "memory.limit_in_bytes"
            (probe / limit).write_text(str(64 << 20))
            probe.rmdir()
            return version, parent
        except OSError:
            try:
                probe.rmdir()
            except OSError:
                pass
    _warn(
        "rewarder sandbox: no memory cgroup can be made here; the memory of a run is bounded"
        " per process (memory_mb x processes), not in total"
    )
    return None


def _make_cgroup(limits: SandboxConfig) -> Path | None:
    found = memory_cgroup()
    if found is None:
        return None
    version, parent = found
    path = parent / f"aha-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    limit = limits.memory_total_mb << 20
    if version == "v2":
        (path / "memory.max").write_text(str(limit))
        for name in ("memory.swap.max", "memory.oom.group"):
            if (path / name).exists():
                (path / name).write_text("0" if name == "memory.swap.max" else "1")
    else:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        if (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return path


def _empty_cgroup(path: Path, deadline: float) -> None:
    """Kill every process left in the cgroup (setsid daemons included), then remove it."""
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            try:
                path.rmdir()
                return
            except OSError:
                pass  # the kernel has not finished with the last one
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    _warn(f"rewarder sandbox: could not empty the cgroup {path}")


# --- the script PID 1 runs -----------------------------------------------------------------


def _ulimits(limits: SandboxConfig) -> str:
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
    if os.geteuid() != 0:
        return ""
    return (
        f"setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs"
        " --inh-caps=-all --bounding-set=-all --"
    )


def _root_setup(limits: SandboxConfig) -> str:
    """Namespaces: the tmpfs over /tmp and the minimal root at /tmp/root."""
    binds = " ".join(ROOT_DIRS)
    etc = " ".join(ROOT_ETC)
    dev = " ".join(ROOT_DEV)
    return f"""mount -t tmpfs -o size={limits.disk_mb}m,nr_inodes={limits.files},mode=755 tmpfs /tmp
R=/tmp/root
mkdir -m 755 $R $R/proc $R/dev $R/etc $R/work $R/check
mkdir -m 1777 $R/tmp
for d in {binds}; do
  if [ -L /$d ]; then ln -s "$(readlink /$d)" $R/$d
  elif [ -d /$d ]; then
    mkdir $R/$d && mount --bind /$d $R/$d && mount -o remount,bind,ro,nosuid,nodev $R/$d
  fi
done
for f in {etc}; do
  if [ -f /etc/$f ]; then
    : > $R/etc/$f && mount --bind /etc/$f $R/etc/$f && mount -o remount,bind,ro $R/etc/$f
  fi
done
for d in $R/usr/lib/python3*/*-packages $R/usr/local/lib/python3*/*-packages; do
  if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k,nr_inodes=16 tmpfs "$d"; fi
done
for n in {dev}; do : > $R/dev/$n && mount --bind /dev/$n $R/dev/$n; done
mount -t proc -o nosuid,nodev,noexec proc $R/proc
"""


def _script(
    mode: str, limits: SandboxConfig, host: Path, cgroup: Path | None, checker: Checker | None
) -> str:
    """PID 1 (namespaces) or the session leader (process); cwd = the host dir, whose `work/`
    and `check/` hold the files; `"$@"` is the program's argv."""
    uid, cuid = limits.uid, limits.checker_uid
    lines = ["set -e"]
    if cgroup is not None:
        lines.append(f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}")
    if mode == "namespaces":
        lines.append(_root_setup(limits))
        lines.append(f"cp -R work/. $R/work/ && chown -R {uid}:{uid} $R/work && chmod 700 $R/work")
        if checker is not None:
            lines.append(
                f"cp -R check/. $R/check/ && chown -R {cuid}:{cuid} $R/check"
                " && chmod 700 $R/check && mkfifo -m 600 /tmp/requests /tmp/replies"
            )
        fifos = "/tmp/requests", "/tmp/replies"
        lines.append(
            "mkdir -m 755 $R/.aha && cp seccomp.py $R/.aha/ && chmod 644 $R/.aha/seccomp.py"
        )
        seccomp = "/.aha/seccomp.py"

        def launch(where: str, uid: int, argv: str) -> str:
            inner = shlex.quote(f'cd /{where} && exec "$@"')
            chroot = shlex.quote(shutil.which("chroot") or "chroot")  # often in /usr/sbin
            return f'{chroot} "$R" /bin/sh -c {inner} sandbox {_drop(uid)} {argv}'
    else:
        if checker is not None:
            lines.append("mkfifo -m 600 requests replies")
        fifos = "requests", "replies"
        seccomp = shlex.quote(str(host / "seccomp.py"))

        def launch(where: str, uid: int, argv: str) -> str:
            return f"(cd {where} && exec {_drop(uid)} {argv})"

    lines += [": > ready", "unset OLDPWD", _ulimits(limits), "set +e"]
    # the program starts under the seccomp filter (see rewarder/harness/seccomp.py)
    program = launch("work", uid, f'{shlex.quote(limits.python)} -I -S {seccomp} "$@"')
    if checker is None:
        lines.append(program)
    else:
        requests, replies = fifos
        checker_argv = " ".join(shlex.quote(a) for a in checker.argv)
        lines.append(f"{program} 3<{requests} 4>{replies} </dev/null 1>&2 &")
        lines.append(
            f"{launch('check', cuid, checker_argv)} 3>{requests} 4<{replies} 5>verdict </dev/null"
        )
    lines.append("exit $?")
    return "\n".join(lines) + "\n"


# --- running -------------------------------------------------------------------------------


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


def _place(directory: Path, files: dict[str, str | bytes]) -> None:
    directory.mkdir()
    for name, content in files.items():
        path = directory / name
        if path.parent != directory:
            raise ValueError(f"sandbox file names are plain names, got {name!r}")
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def _feed(pipe, data: bytes) -> None:
    """Write stdin from a thread (the program may read it slowly, or never)."""
    try:
        pipe.write(data)
    except OSError:  # the program exited without reading it all
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def run_program(
    files: dict[str, str | bytes],
    argv: list[str],
    stdin: str | bytes = b"",
    limits: SandboxConfig = SandboxConfig(),
    checker: Checker | None = None,
) -> RunResult:
    """Run `argv` on `files` (name -> content, put in its work dir) under `limits`, and
    `checker` beside it if given.

    A program that crashes, runs out of time or memory is a result (`ok` False), not an
    error; `SandboxError` means the sandbox itself did not work, or would not hold.
    """
    mode = isolation() if limits.isolation != "process" else "process"
    if mode != "namespaces" and limits.isolation == "namespaces":
        raise SandboxError("namespaces are not available here and isolation='namespaces' is set")
    if os.geteuid() != 0 and not limits.allow_own_user:
        raise SandboxError(
            "not root: untrusted code would run as the rewarder's own user, able to read its"
            " memory, environment and files; run the rewarder as root (it drops to an"
            " unprivileged uid) or set sandbox.allow_own_user = true"
        )
    if checker is not None and limits.checker_uid == limits.uid:
        raise SandboxError("checker_uid must differ from uid: the checker would be reachable")
    start = time.monotonic()
    data = stdin.encode() if isinstance(stdin, str) else stdin
    cgroup = _make_cgroup(limits)
    try:
        with tempfile.TemporaryDirectory(prefix="aha-sandbox-") as tmp:
            result = _run(Path(tmp), files, argv, data, limits, checker, mode, cgroup)
    finally:
        if cgroup is not None:
            _empty_cgroup(cgroup, time.monotonic() + 5.0)
    return RunResult(**result, seconds=time.monotonic() - start, isolation=mode)


def _run(host, files, argv, stdin, limits, checker, mode, cgroup) -> dict:
    """One run in the host dir `host`: lay out the files, start PID 1, collect the outcome."""
    _lay_out(host, files, limits, checker, mode)
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": "/work" if mode == "namespaces" else str(host / "work"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    setpriv = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    prefix = []
    if mode == "namespaces":
        prefix = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
    script = _script(mode, limits, host, cgroup, checker)
    cmd = [*setpriv, *prefix, "sh", "-c", script, "sandbox", *argv]
    returncode, timed_out = _execute(cmd, host, env, stdin, limits.wall_seconds, mode)
    if not (host / "ready").exists():
        raise SandboxError(
            f"the sandbox did not start (exit {returncode}): "
            + _read_head(host / "stderr", 2000).strip()
        )
    verdict = None
    if checker is not None:
        verdict = _read_head(host / "verdict", 4096) if (host / "verdict").exists() else ""
    return {
        "returncode": returncode,
        "stdout": _read_head(host / "stdout", limits.output_bytes),
        "stderr": _read_head(host / "stderr", limits.output_bytes),
        "timed_out": timed_out,
        "verdict": verdict,
    }


def _lay_out(host: Path, files, limits: SandboxConfig, checker: Checker | None, mode: str) -> None:
    """`work/` (the program's files), `check/` (the checker's) and the seccomp launcher."""
    _place(host / "work", files)
    _place(host / "check", checker.files if checker else {})
    (host / "seccomp.py").write_text(SECCOMP.read_text())
    os.chmod(host / "seccomp.py", 0o644)
    if mode != "namespaces" and os.geteuid() == 0:  # namespaces: PID 1 copies and chowns
        os.chown(host, 0, 0)
        os.chmod(host, 0o711)  # each uid reaches its own dir, lists nothing
        for where, uid in (("work", limits.uid), ("check", limits.checker_uid)):
            for path in [host / where, *(host / where).iterdir()]:
                os.chown(path, uid, uid)
            os.chmod(host / where, 0o700)


def _execute(
    cmd: list[str], host: Path, env: dict, stdin: bytes, wall_seconds: float, mode: str
) -> tuple[int | None, bool]:
    """(exit status, timed out): run PID 1 with stdin fed through a pipe, killed at the wall
    time with everything it started."""
    with open(host / "stdout", "wb") as fout, open(host / "stderr", "wb") as ferr:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=host,
                env=env,
                stdin=subprocess.PIPE,
                stdout=fout,
                stderr=ferr,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise SandboxError(f"could not start the sandbox: {e}") from e
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
        feeder.start()
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout=wall_seconds)
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
        feeder.join(timeout=1.0)
    if returncode is not None and returncode < 0:
        returncode = 128 - returncode
    return returncode, timed_out


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
    source: str, stdin: str | bytes = b"", limits: SandboxConfig = SandboxConfig()
) -> RunResult:
    """Run Python `source` as `main.py` in the sandbox (`-I`: no user site, no PYTHON* vars)."""
    return run_program({"main.py": source}, [limits.python, "-I", "main.py"], stdin, limits)
