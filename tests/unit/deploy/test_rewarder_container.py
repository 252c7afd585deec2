"""The rewarder's code sandbox inside the container the deployments give it.

compose and Helm run the rewarder as root with every capability dropped but a few, a
read-only root file system with a tmpfs on /tmp, and no-new-privileges. No container engine
runs here, so the test builds the same confinement on the host with the kernel's own tools
(util-linux `unshare` and `setpriv`, as root): a private mount namespace in which every
mount is read-only but a fresh noexec tmpfs on /tmp (Docker's tmpfs options), a capability
bounding set of exactly the deployment's list (a root process then holds exactly those, as in
a container), no_new_privs. In it, the real sandbox must run a program in its namespaces
without network and `code_tests` must tell a solution from a wrong one; without any one of
the capabilities it must not, so the list holds nothing the sandbox does not need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.deploy.test_compose import SANDBOX_CAPABILITIES, compose_config

ROOT = Path(__file__).resolve().parents[3]

PROBE = r"""
import sys, warnings
warnings.simplefilter("ignore")
from rewarder.sandbox import isolation, run_python
from rewarder.code import code_tests

assert isolation() == "namespaces", isolation()
net = (
    "import socket\n"
    "try:\n"
    "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    "    print('network')\n"
    "except OSError:\n"
    "    print('no network')\n"
)
run = run_python("print(6 * 7)\n" + net)
assert run.ok and run.stdout == "42\nno network\n", run
test = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
right = code_tests("```python\ndef add(a, b):\n    return a + b\n```", test)
wrong = code_tests("```python\ndef add(a, b):\n    return a - b\n```", test)
assert (right, wrong) == (1.0, 0.0), (right, wrong)
print("sandbox ok")
"""

CONFINE = r"""
set -e
# The checkout and its venv, where they live under /tmp (a CI clone), stay visible: the image
# has them in its root, not in its /tmp. Held aside under /dev/shm, put back over the tmpfs.
i=0
for keep in $AHA_KEEP; do
  mkdir -p /dev/shm/aha-keep-$i && mount --rbind "$keep" /dev/shm/aha-keep-$i
  i=$((i + 1))
done
# Every mount read-only (as a container's read-only root and its read-only mounts), but /proc
# and /dev, which a container gets fresh; /tmp a new noexec tmpfs (compose `tmpfs: [/tmp]`).
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  case "$m" in /proc|/proc/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount -t tmpfs -o noexec,nosuid,nodev tmpfs /tmp
i=0
for keep in $AHA_KEEP; do
  mkdir -p "$keep" && mount --rbind /dev/shm/aha-keep-$i "$keep"
  i=$((i + 1))
done
caps=$1; shift
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="-all,$caps" -- "$@"
"""


def confined(capabilities: set[str]) -> subprocess.CompletedProcess:
    """The probe, as root with only `capabilities`, read-only root, tmpfs /tmp, no_new_privs."""
    caps = ",".join(f"+{c.lower()}" for c in sorted(capabilities))
    keep = {
        str(path)
        for path in (ROOT, Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent)
        if path.is_relative_to("/tmp")
    }
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "AHA_KEEP": " ".join(sorted(keep)),
    }
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CONFINE, "confine"]
        + [caps, sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def can_confine() -> None:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root and util-linux unshare/setpriv to confine like a container")
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("this host does not allow mount/network/PID namespaces")


def test_compose_grants_the_rewarder_exactly_the_sandbox_capabilities():
    rewarder = compose_config("compose.yaml")["services"]["rewarder"]
    assert rewarder["cap_drop"] == ["ALL"]
    assert set(rewarder["cap_add"]) == SANDBOX_CAPABILITIES
    assert rewarder["read_only"] is True and rewarder["tmpfs"] == ["/tmp"]


def test_the_sandbox_works_in_the_rewarder_container(can_confine):
    out = confined(SANDBOX_CAPABILITIES)
    assert out.returncode == 0 and "sandbox ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("capability", sorted(SANDBOX_CAPABILITIES))
def test_the_sandbox_needs_every_capability_it_is_given(can_confine, capability):
    out = confined(SANDBOX_CAPABILITIES - {capability})
    assert out.returncode != 0, f"the sandbox works without {capability}: drop it everywhere"
    assert "Traceback" in out.stderr, out.stderr  # the probe ran, and the sandbox failed in it
