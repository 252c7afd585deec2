"""Hostile programs in the sandbox: each must end inside the limits, score 0, and be contained.

Containment is asserted on the host, not taken from the program's word: the file it wrote
outside its work dir does not exist, the listener on 127.0.0.1 got no connection, the secret
is not in anything it printed, and no process of a sandbox uid is left.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from rewarder.rewards import code_tests, configure_sandbox
from rewarder.sandbox import SandboxConfig, isolation, memory_cgroup, run_python
from tests.unit.rewarder.leftovers import assert_nothing_left

needs_namespaces = pytest.mark.skipif(
    isolation() != "namespaces", reason="needs root and network/PID/mount namespaces (unshare)"
)
LIMITS = SandboxConfig(wall_seconds=2.0, cpu_seconds=2, memory_mb=512, processes=16)
# A program passes this only if it prints "ok" and exits cleanly.
PRINT_OK = {"inputs": [""], "outputs": ["ok"]}


@pytest.fixture(autouse=True)
def short_limits():
    configure_sandbox(LIMITS)
    yield
    configure_sandbox(SandboxConfig())


def test_a_normal_program_runs_as_nobody_in_a_fresh_dir():
    result = run_python(
        "import os; print(os.getuid(), os.getgid(), os.getcwd(), sorted(os.listdir('.')), input())",
        stdin="hello\n",
        limits=LIMITS,
    )
    assert result.ok, result.stderr
    cwd = "/work" if result.isolation == "namespaces" else os.getcwd()
    uid, gid, where, files, echoed = result.stdout.split(" ", 4)
    assert (uid, gid, echoed.strip()) == ("65534", "65534", "hello")
    assert files == "['main.py']"
    assert where == cwd or result.isolation == "process"
    assert_nothing_left()


@needs_namespaces
def test_fork_bomb_ends_at_the_wall_time_and_leaves_nothing():
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.monotonic()
    result = run_python(bomb, limits=LIMITS)
    assert result.timed_out and not result.ok
    assert time.monotonic() - start < LIMITS.wall_seconds + 3
    assert_nothing_left()
    assert code_tests(bomb, PRINT_OK) == 0.0
    assert_nothing_left()


@needs_namespaces
def test_the_process_limit_holds_although_we_are_root():
    # 16 processes for the uid: the sandbox's own python is one, so at most 15 forks succeed
    program = (
        "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        n += 1\n    except OSError:\n"
        "        break\nprint(n, flush=True)\nos._exit(0)\n"
    )
    result = run_python(program, limits=LIMITS)
    assert result.ok, result.stderr
    assert 0 < int(result.stdout) < LIMITS.processes
    assert_nothing_left()  # the sleeping children died with the namespace


@needs_namespaces
def test_memory_bomb_fails_fast():
    bomb = "x = bytearray(8 * 1024**3)\nprint('ok')\n"
    result = run_python(bomb, limits=LIMITS)
    assert not result.ok and "MemoryError" in result.stderr
    assert not result.timed_out  # the address-space limit stopped it, not the clock
    assert code_tests(bomb, PRINT_OK) == 0.0
    assert_nothing_left()


@needs_namespaces
@pytest.mark.parametrize(
    "program", ["while True:\n    pass\n", "import time\ntime.sleep(3600)\nprint('ok')\n"]
)
def test_infinite_loop_and_sleep_end_at_the_wall_time(program):
    start = time.monotonic()
    result = run_python(program, limits=LIMITS)
    assert result.timed_out and result.returncode is None
    assert LIMITS.wall_seconds <= time.monotonic() - start < LIMITS.wall_seconds + 3
    assert code_tests(program, PRINT_OK) == 0.0
    assert_nothing_left()


@needs_namespaces
def test_no_network_not_even_localhost():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = (
        "import socket\ns = socket.socket()\ns.settimeout(1)\n"
        f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('ok')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    )
    try:
        result = run_python(program, limits=LIMITS)
        assert result.stdout.startswith("refused"), result.stdout  # ENETUNREACH: lo is down
        assert code_tests(program, PRINT_OK) == 0.0
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()
    assert_nothing_left()


@needs_namespaces
def test_writes_outside_the_work_dir_do_not_land(tmp_path):
    token = secrets.token_hex(8)
    targets = [
        f"/tmp/aha-escape-{token}",
        f"/var/tmp/aha-escape-{token}",
        f"/dev/shm/aha-escape-{token}",
        f"{tmp_path}/aha-escape-{token}",
        f"/work/aha-escape-{token}",
        f"../aha-escape-{token}",
    ]
    os.chmod(tmp_path, 0o777)  # even a world-writable host dir is out of reach
    program = f"for path in {targets!r}:\n" + (
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('failed', path, e.errno)\n"
    )
    result = run_python(program, limits=LIMITS)
    assert result.ok, result.stderr
    for target in targets:
        assert not Path(target).exists(), target
        assert not Path("/tmp", Path(target).name).exists()
    # the private /tmp took the write and vanished with the mount namespace; the others failed
    assert f"wrote /tmp/aha-escape-{token}" in result.stdout
    assert f"failed {tmp_path}/aha-escape-{token}" in result.stdout
    assert_nothing_left()


@needs_namespaces
def test_the_parents_environment_is_not_visible(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("AHA_TEST_SECRET", secret)
    program = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n"
        "            print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "        except OSError as e:\n            print(pid, 'denied', e.errno)\n"
        f"print('ok' if {secret!r} in str(dict(os.environ)) else 'no')\n"
    )
    result = run_python(program, limits=LIMITS)
    assert secret not in result.stdout and secret not in result.stderr
    assert "AHA_TEST_SECRET" not in result.stdout
    assert code_tests(program, PRINT_OK) == 0.0
    assert_nothing_left()


@needs_namespaces
def test_a_double_forking_daemon_does_not_outlive_the_run():
    daemon = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(3600)\n    os._exit(0)\nos.wait()\nprint('ok')\n"
    )
    result = run_python(daemon, limits=LIMITS)
    assert result.ok and result.stdout == "ok\n"
    assert result.seconds < LIMITS.wall_seconds  # returned when the parent did
    assert_nothing_left()  # the grandchild died with the PID namespace


@needs_namespaces
def test_output_is_capped_and_the_file_limit_holds():
    limits = LIMITS.model_copy(update={"file_mb": 1, "output_bytes": 1000})
    result = run_python(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=limits
    )
    assert not result.ok and not result.timed_out  # SIGXFSZ at 1 MiB, long before the clock
    assert len(result.stdout) == 1000
    assert_nothing_left()


def test_process_isolation_fallback_still_drops_root_and_cleans_up():
    """What holds without namespaces: uid, env, rlimits, the process group killed as a whole."""
    if os.geteuid() != 0:
        pytest.skip("dropping to the sandbox uid needs root")
    limits = LIMITS.model_copy(update={"isolation": "process"})
    result = run_python("import os; print(os.getuid(), sorted(os.environ))", limits=limits)
    assert result.isolation == "process" and result.ok
    assert result.stdout.split(" ", 1)[0] == "65534"
    assert "AHA" not in result.stdout and "VIRTUAL_ENV" not in result.stdout
    # a forked child (no setsid) sleeping past the run is killed with its process group
    result = run_python(
        "import os, time\nif os.fork() == 0:\n    time.sleep(3600)\nprint('ok')\n", limits=limits
    )
    assert result.ok
    result = run_python("while True:\n    pass\n", limits=limits)
    assert result.timed_out
    assert_nothing_left(within=5.0)  # killed processes are reaped by init, maybe a moment later


@needs_namespaces
def test_host_unix_sockets_and_files_are_out_of_sight():
    """The program sees a minimal root: no /run, /var, /root, /home, no project files, and
    so no host unix socket, however open its permissions."""
    token = secrets.token_hex(8)
    run_dir = Path("/run") if Path("/run").is_dir() else Path("/var/run")
    sock_path = run_dir / f"aha-test-{token}.sock"
    secret = Path("/var/lib") / f"aha-test-secret-{token}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o777)
    listener.listen(8)
    listener.setblocking(False)
    secret.write_text(token)
    secret.chmod(0o644)
    program = (
        "import os, socket\n"
        f"for path in [{str(sock_path)!r}, {str(secret)!r}, {str(Path(__file__))!r}]:\n"
        "    try:\n        s = socket.socket(socket.AF_UNIX)\n        s.connect(path)\n"
        "        print('connected', path)\n    except OSError as e:\n        print('no socket', e.errno)\n"
        "    try:\n        print('read', open(path).read())\n    except OSError as e:\n"
        "        print('no file', e.errno)\n"
        "print(sorted(os.listdir('/')))\n"
    )
    try:
        result = run_python(program, limits=LIMITS)
        assert result.ok, result.stderr
        assert "connected" not in result.stdout and "read" not in result.stdout.replace("'", "")
        assert token not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
        for hidden in ("'run'", "'var'", "'root'", "'home'", "'srv'"):
            assert hidden not in result.stdout.splitlines()[-1]
    finally:
        listener.close()
        sock_path.unlink(missing_ok=True)
        secret.unlink(missing_ok=True)
    assert_nothing_left()


@needs_namespaces
def test_no_user_namespaces_inside():
    """`unshare -U -r` would give uid 0 with every capability inside a new user namespace: the
    kernel refuses it to a chrooted process."""
    program = (
        "import subprocess\n"
        "r = subprocess.run(['unshare', '-U', '-r', 'id', '-u'], capture_output=True, text=True)\n"
        "print(r.returncode, r.stdout.strip(), r.stderr.strip())\n"
    )
    result = run_python(program, limits=LIMITS)
    assert result.ok, result.stderr
    code, _, rest = result.stdout.partition(" ")
    assert int(code) != 0 and not rest.startswith("0"), result.stdout
    assert_nothing_left()


@needs_namespaces
def test_the_inode_limit_holds():
    limits = LIMITS.model_copy(update={"files": 300})
    program = (
        "import os\nn = 0\ntry:\n    for i in range(100000):\n"
        "        open(f'f{i}', 'w').close()\n        n += 1\nexcept OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    result = run_python(program, limits=limits)
    assert result.ok, result.stderr
    made, errno = result.stdout.split()
    assert int(made) < 300 and int(errno) == 28  # ENOSPC
    assert_nothing_left()


@needs_namespaces
def test_the_total_memory_of_a_run_is_capped():
    """Four processes of 400 MB each stay under the per-process limit; together they pass
    the run's 1 GB: the memory cgroup kills them. Without a cgroup all four would finish."""
    if memory_cgroup() is None:
        pytest.skip("no memory cgroup can be made here")
    limits = LIMITS.model_copy(update={"memory_mb": 1024, "memory_total_mb": 1024})
    program = (
        "import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
        "    if pid == 0:\n        x = bytearray(400 << 20)\n        for i in range(0, len(x), 4096):\n"
        "            x[i] = 1\n        time.sleep(0.5)\n        os._exit(0)\n    pids.append(pid)\n"
        "ok = sum(os.waitpid(p, 0)[1] == 0 for p in pids)\nprint('finished', ok)\n"
    )
    result = run_python(program, limits=limits)
    assert "finished 4" not in result.stdout, result.stdout
    assert_nothing_left()


@needs_namespaces
def test_stdin_is_a_pipe_that_cannot_be_read_twice():
    program = (
        "import os, sys\nfirst = sys.stdin.read()\n"
        "try:\n    os.lseek(0, 0, 0)\n    print('rewound')\nexcept OSError as e:\n    print('pipe', e.errno)\n"
        "print(repr(first), repr(sys.stdin.read()))\n"
    )
    result = run_python(program, stdin="secret input\n", limits=LIMITS)
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["pipe 29", "'secret input\\n' ''"]  # ESPIPE
    assert_nothing_left()


def test_not_root_refuses_to_run_as_the_rewarders_own_user():
    """Without root the program would keep the rewarder's uid (and read its environment: the
    NATS password); refused unless allowed."""
    script = (
        "import os, sys\n"
        "from rewarder.sandbox import run_python, SandboxConfig, SandboxError, describe\n"
        "os.setgid(65534); os.setuid(65534)  # after the imports: the venv may be under /root\n"
        "try:\n    run_python('print(1)', limits=SandboxConfig(isolation='process'))\n"
        "    print('ran')\nexcept SandboxError as e:\n    print('refused:', e)\n"
        "r = run_python('print(1)', limits=SandboxConfig(isolation='process', allow_own_user=True))\n"
        "print('allowed', r.stdout.strip())\n"
        "print('can run code:', describe(SandboxConfig())[0])\n"
    )
    if os.geteuid() != 0:
        pytest.skip("the test drops from root to show it")
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[3],
        timeout=60,
    )
    assert "refused: not root" in out.stdout, out.stdout + out.stderr
    assert "allowed 1" in out.stdout, out.stdout + out.stderr
    assert "can run code: False" in out.stdout  # what the rewarder warns about at start


SYSCALLS = r"""
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    ctypes.set_errno(0)
    return getattr(libc, name)(*args), ctypes.get_errno()
print("keyctl", *call("syscall", 250, 0, -3, 0))  # KEYCTL_GET_KEYRING_ID of the session
print("ptrace", *call("ptrace", 0, 0, 0, 0))  # PTRACE_TRACEME
print("unshare", *call("unshare", 0x04000000))  # CLONE_NEWUTS
t = threading.Thread(target=print, args=("thread ok",))
t.start()
t.join()
print(subprocess.run(["echo", "subprocess ok"], capture_output=True, text=True).stdout.strip())
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="no filter for it")
def test_the_seccomp_filter_refuses_what_a_program_has_no_business_calling(tmp_path):
    """keyctl succeeds for an ordinary process (shown on the host), as ptrace(TRACEME) would;
    the sandboxed program gets EPERM, and threads and subprocesses still work."""
    import subprocess
    import sys

    keyctl = SYSCALLS.split('print("ptrace"')[0]
    host = subprocess.run(
        [sys.executable, "-c", keyctl], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert host[0] == "keyctl" and int(host[1]) > 0, host
    for mode in ("auto", "process") if os.geteuid() == 0 else ("auto",):
        result = run_python(SYSCALLS, limits=LIMITS.model_copy(update={"isolation": mode}))
        assert result.ok, result.stderr
        assert result.stdout.splitlines() == [
            "keyctl -1 1",
            "ptrace -1 1",
            "unshare -1 1",
            "thread ok",
            "subprocess ok",
        ], mode
    assert_nothing_left()


@needs_namespaces
def test_installed_packages_are_out_of_sight():
    """An image may install aha (and the benchmarks it ships, answers included) into a
    site-packages under /usr: the program sees every such folder empty."""
    token = secrets.token_hex(8)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    planted = Path("/usr/local/lib") / version / "site-packages" / f"aha-test-{token}.txt"
    made = [p for p in (planted.parent.parent, planted.parent) if not p.exists()]
    for path in made:
        path.mkdir()
    planted.write_text(token)
    program = (
        "import sys, os\n"
        "seen = [p for p in sys.path if p.endswith('-packages') and os.path.isdir(p) and os.listdir(p)]\n"
        f"print(seen, os.path.exists({str(planted)!r}))\n"
    )
    try:
        result = run_python(program, limits=LIMITS)
    finally:
        planted.unlink()
        for path in reversed(made):
            path.rmdir()
    assert result.ok, result.stderr
    assert result.stdout.strip() == "[] False"
    assert_nothing_left()
