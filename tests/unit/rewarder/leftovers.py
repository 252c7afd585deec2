"""Which sandboxed processes are still alive: the containment tests' proof of cleanup."""

from __future__ import annotations

import time
from pathlib import Path

SANDBOX_UIDS = [*range(65534 - 7, 65535), *range(64534 - 7, 64535)]
"""65534 (nobody) and 64534 (the checker), and the per-worker uids the verifier pool counts
down from them."""


def sandbox_processes() -> list[str]:
    """`pid uid state name` of every process (zombies included) owned by a sandbox uid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(
                line.split(":\t", 1)
                for line in (entry / "status").read_text().splitlines()
                if ":\t" in line
            )
        except OSError:
            continue
        uid = int(status["Uid"].split()[0])
        if uid in SANDBOX_UIDS:
            found.append(f"{entry.name} uid={uid} {status['State']} {status['Name']}")
    return found


def assert_nothing_left(within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
