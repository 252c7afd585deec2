"""The `aha up` supervisor with real child processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from deploy.supervisor import SERVER, Part, Supervisor
from tests.helpers import processes_with

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
        wait_for(lambda name=name: "ready" in sup.tail(name))
    start = time.monotonic()
    codes = sup.stop(grace_s=0.5)
    assert codes["learner"] == 0 and codes["rewarder-0"] == 0
    assert codes["actor-0"] == -9  # SIGKILL after the grace period
    assert time.monotonic() - start < 5
    assert marker.read_text().split() == ["learner", "rewarder"]


# A part that starts children the way vLLM starts its EngineCore (multiprocessing, fork and
# spawn), prints their pids, and sleeps.
TREE = (
    "import multiprocessing as mp, os, sys, time\n"
    "if __name__ == '__main__':\n"
    "    kids = [mp.get_context(m).Process(target=time.sleep, args=(60,))\n"
    "            for m in ('fork', 'spawn')]\n"
    "    for k in kids: k.start()\n"
    "    print('kids', *[k.pid for k in kids], flush=True)\n"
    "    time.sleep(60)\n"
)


def start_tree(sup: Supervisor, tmp_path: Path, name: str) -> set[int]:
    script = tmp_path / f"{name}.py"
    script.write_text(TREE)
    sup.start(Part(name, [PY, str(script)], restart=False))
    wait_for(lambda: "kids" in sup.tail(name))
    tree = processes_with(sup.marker(name))
    assert len(tree) >= 3  # the part, its two children (and spawn's resource tracker)
    return tree


def test_a_killed_part_takes_its_whole_process_tree_with_it(tmp_path):
    sup = Supervisor(tmp_path)
    start_tree(sup, tmp_path, "actor-0")
    os.kill(sup.running["actor-0"].process.pid, signal.SIGKILL)  # as the OOM killer would
    exits = []
    wait_for(lambda: exits.extend(sup.poll()) or exits)
    assert exits[0].returncode == -9
    wait_for(lambda: not processes_with(sup.marker("actor-0")), timeout=5)


def test_stop_leaves_no_process_of_any_part(tmp_path):
    sup = Supervisor(tmp_path)
    start_tree(sup, tmp_path, "actor-0")
    start_tree(sup, tmp_path, "rewarder-0")
    sup.stop(grace_s=5)  # the parts exit on SIGTERM; their children would not
    assert not processes_with(sup.marker("actor-0"))
    assert not processes_with(sup.marker("rewarder-0"))


async def test_a_killed_nats_server_is_restarted_on_its_ports_and_store(tmp_path):
    from protocol.bus import Bus
    from protocol.config import BusConfig
    from protocol.names import TASKS
    from protocol.server import NatsServer
    from protocol.stage import StageConsumer
    from tests.helpers import make_task

    with NatsServer(tmp_path / "nats") as server:
        sup = Supervisor(tmp_path / "logs")
        sup.watch_server(server)
        url, old_pid = server.url, server.process.pid
        bus = await Bus.connect(BusConfig(url=url), name="test")
        try:
            await bus.publish(TASKS, make_task(1))
            os.kill(old_pid, signal.SIGKILL)
            exits = []
            wait_for(lambda: exits.extend(sup.poll()) or exits)
            assert [(e.name, e.returncode, e.restarted) for e in exits] == [(SERVER, -9, True)]
            assert server.url == url and server.process.pid != old_pid
            # The client reconnects by itself; what was acknowledged before is still there.
            await bus.publish(TASKS, make_task(2))
            got = await StageConsumer(bus, TASKS).fetch(2, timeout=5)
            assert sorted(d.message.task_id for d in got) == ["task-1", "task-2"]
        finally:
            await bus.close()
