"""The `aha up` supervisor with real child processes."""

from __future__ import annotations

import sys
import time

from deploy.supervisor import Part, Supervisor

PY = sys.executable


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_crashing_part_is_restarted_up_to_the_limit_and_logged(tmp_path):
    sup = Supervisor(tmp_path, max_restarts=2)
    sup.start(Part("actor-0", [PY, "-c", "print('up'); raise SystemExit(3)"], restart=True))
    exits = []
    wait_for(lambda: exits.extend(sup.poll()) or len(exits) == 3)
    assert [(e.returncode, e.restarted) for e in exits] == [(3, True), (3, True), (3, False)]
    assert not sup.alive("actor-0")
    assert (tmp_path / "actor-0.log").read_text().count("up") == 3
    assert "up" in exits[-1].log_tail


def test_a_part_without_restart_is_reported_once(tmp_path):
    sup = Supervisor(tmp_path)
    sup.start(
        Part("learner", [PY, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(1)"])
    )
    exits = []
    wait_for(lambda: exits.extend(sup.poll()) or exits)
    assert exits[0].name == "learner" and exits[0].returncode == 1 and not exits[0].restarted
    assert "boom" in exits[0].log_tail


def test_stop_terminates_in_order_and_kills_what_ignores_sigterm(tmp_path):
    sup = Supervisor(tmp_path)
    marker = tmp_path / "order"
    graceful = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(marker)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    sup.start(Part("rewarder-0", [PY, "-c", graceful, "rewarder"], stop_order=2))
    sup.start(Part("learner", [PY, "-c", graceful, "learner"], stop_order=0))
    sup.start(Part("actor-0", [PY, "-c", stubborn], stop_order=1))
    for name in ("rewarder-0", "learner", "actor-0"):
        wait_for(lambda: "ready" in sup.tail(name))
    start = time.monotonic()
    codes = sup.stop(grace_s=0.5)
    assert codes["learner"] == 0 and codes["rewarder-0"] == 0
    assert codes["actor-0"] == -9  # SIGKILL after the grace period
    assert time.monotonic() - start < 5
    assert marker.read_text().split() == ["learner", "rewarder"]
