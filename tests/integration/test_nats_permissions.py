"""The locked-down NATS of the deployments, against aha's real code paths.

A real nats-server runs `deploy/nats/nats.conf` (the file compose mounts; the Helm chart
renders the same users and permissions, checked in tests/unit/deploy/test_helm.py). Each role
connects with the environment its compose service gets and does its real work; a role that
steps outside its permissions is refused, and the server says so in its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import nats
import numpy as np
import pytest
import yaml
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from actors.weights import download_shards
from protocol.bus import Bus
from protocol.codec import decode
from protocol.config import BusConfig, StageConfig, load_config
from protocol.depth import queue_depth
from protocol.messages import Sampling, WeightManifest
from protocol.names import (
    KEY_LATEST,
    KV_POLICY,
    OBJECT_STORE_WEIGHTS,
    ROLLOUTS,
    SCORED,
    STREAM_DEAD,
    TASKS,
    Stage,
    inbox_prefix,
)
from protocol.server import NatsServer
from protocol.stage import StageConsumer, run_stage, watch_max_deliveries
from protocol.weights import describe_shard, object_name, upload_file
from tests.helpers import make_rollout, make_task

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLES = {
    "learner": "learner",
    "actor": "actor",
    "rewarder": "rewarder",
    "jobs": "jobs",
    "exporter": "exporter",
}
"""compose service -> NATS user."""

KV_POLICY_STREAM = f"KV_{KV_POLICY}"
"""The stream behind the KV bucket (nats-py's naming)."""
FAST = StageConfig(ack_wait_s=2.0, max_deliver=2, backoff_s=[0.05])


def _interpolate(value: str, env: dict[str, str]) -> str:
    # ${NAME}, ${NAME:-default}, ${NAME:?message}: what compose does with deploy/.env.
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} is not set ({arg})")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


def service_environment(service: str, env: dict[str, str]) -> dict[str, str]:
    """The environment compose gives `service` (deploy/compose.yaml), with `env` as deploy/.env."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    raw = compose["services"][service]["environment"]
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


@pytest.fixture
def passwords(monkeypatch) -> dict[str, str]:
    """deploy/.env: one password per role, also in the server's environment."""
    env = {f"AHA_NATS_{role.upper()}_PASSWORD": f"{role}-pw-0123" for role in ROLES.values()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def server(tmp_path, passwords):
    """nats-server with compose's deploy/nats/nats.conf."""
    with NatsServer(tmp_path / "nats", config_file=DEPLOY / "nats" / "nats.conf") as server:
        yield server


def helm_auth_conf(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The Helm chart's rendered auth.conf in a server config, and its generated passwords."""
    helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the dev extra)")
    with helm.Chart.load(DEPLOY / "helm" / "aha") as chart:
        rendered = chart.render({}, name="aha", namespace="rl")
    secret = yaml.safe_load(rendered["aha/templates/secret-nats-auth.yaml"])["stringData"]
    (tmp_path / "auth.conf").write_text(secret["auth.conf"])
    conf = tmp_path / "server.conf"
    conf.write_text('jetstream: enabled\ninclude "auth.conf"\n')  # the NATS chart's $include
    env = {f"AHA_NATS_{r.upper()}_PASSWORD": secret[f"{r}-password"] for r in ROLES.values()}
    return conf, env


@pytest.fixture(params=["compose", "helm"])
def deployment(request, tmp_path, monkeypatch):
    """(server, passwords) for the compose config or the Helm chart's rendered users."""
    if request.param == "compose":
        conf = DEPLOY / "nats" / "nats.conf"
        env = {f"AHA_NATS_{role.upper()}_PASSWORD": f"{role}-pw-0123" for role in ROLES.values()}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    else:
        conf, env = helm_auth_conf(tmp_path)
    with NatsServer(tmp_path / "nats", config_file=conf) as server:
        yield server, env


def role_config(server: NatsServer, service: str, passwords: dict[str, str]) -> BusConfig:
    """The service's BusConfig, loaded as `aha` loads it: compose environment over the file."""
    environ = service_environment(service, passwords)
    assert environ.pop("NATS_URL") == "nats://nats:4222"  # read from os.environ at connect
    config = load_config(BusConfig, DEPLOY / "aha.toml", section="bus", environ=environ)
    fast = {"tasks": FAST, "rollouts": FAST, "scored": FAST}
    return config.model_copy(update={"url": server.url, **fast})


def violations(server: NatsServer) -> set[tuple[str, str, str]]:
    """(user, Publish | Subscription, subject) for every permissions violation the server logged."""
    pattern = r'"\$G/user:(\w+)" - (Publish|Subscription) Violation - Subject "([^"]+)"'
    return set(re.findall(pattern, server.log_file.read_text(errors="replace")))


async def publish_weights_as_learner(bus: Bus, directory: Path) -> WeightManifest:
    """Shards to the object store, then the manifest to KV (learner/weights.py's order)."""
    from protocol.codec import encode

    path = directory / "model-00001-of-00001.safetensors"
    path.write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    shard = describe_shard(path, ["w"])
    store = await bus.js.object_store(OBJECT_STORE_WEIGHTS)
    await upload_file(bus.js, store, object_name(1, shard.name), path, shard.sha256)
    manifest = WeightManifest(version=1, step=1, shards=[shard], dtype="float32")
    kv = await bus.js.key_value(KV_POLICY)
    await kv.put(KEY_LATEST, encode(manifest))
    return manifest


async def abandon(bus: Bus, stage: Stage) -> None:
    """Fetch and nak the next message until the server gives up on it (max_deliver)."""
    consumer = StageConsumer(bus, stage)
    for _ in range(FAST.max_deliver):
        (delivery,) = await consumer.fetch(1, timeout=5)
        await delivery.nak()
    await consumer.fetch(1, timeout=0.5)  # the server notices the exhausted message
    await consumer.close()


async def wait_for_dead_letters(bus: Bus, n: int) -> None:
    for _ in range(100):
        if (await bus.js.stream_info(STREAM_DEAD)).state.messages >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} dead letters")


async def test_every_role_does_its_work_within_its_permissions(deployment, tmp_path):
    server, passwords = deployment
    cfg = {svc: role_config(server, svc, passwords) for svc in ROLES}
    assert cfg["learner"].setup_streams and not any(
        cfg[s].setup_streams for s in ("actor", "rewarder", "jobs", "exporter")
    )
    learner = await Bus.connect(cfg["learner"], name="learner")  # creates the streams
    actor = await Bus.connect(cfg["actor"], name="actor")
    rewarder = await Bus.connect(cfg["rewarder"], name="rewarder")
    exporter = await Bus.connect(cfg["exporter"], name="exporter")
    try:
        learner_advisories = await watch_max_deliveries(learner, SCORED)
        actor_advisories = await watch_max_deliveries(actor, TASKS)
        rewarder_advisories = await watch_max_deliveries(rewarder, ROLLOUTS)

        # Learner: weights and two tasks.
        (tmp_path / "out").mkdir()
        manifest = await publish_weights_as_learner(learner, tmp_path / "out")
        for i in range(2):
            await learner.publish(TASKS, make_task(i))

        # Exporter: queue depth, read-only.
        depth = await queue_depth(exporter.js)
        assert depth["tasks"].pending == 2

        # Actor: the manifest (get and watch), the shards from the object store.
        kv = await actor.js.key_value(KV_POLICY)
        entry = await kv.get(KEY_LATEST)
        assert decode(entry.value, WeightManifest) == manifest
        watcher = await kv.watch(KEY_LATEST)
        seen = await watcher.updates(timeout=5)
        assert decode(seen.value, WeightManifest).version == 1
        await watcher.stop()
        paths = await download_shards(actor.js, manifest, tmp_path / "actor")
        assert paths[0].read_bytes() == (tmp_path / "out" / manifest.shards[0].name).read_bytes()

        # Actor: one task through the stage loop, tasks -> rollouts.
        async def generate(task):
            return make_rollout(task, version=manifest.version)

        stop = asyncio.Event()
        stats = await run_stage(actor, TASKS, generate, output=ROLLOUTS, stop=stop, max_messages=1)
        assert stats.handled == 1

        # Actor: the other task is abandoned until the server gives up; the max-deliveries
        # advisory makes the actor read it, dead-letter it and delete it from the stream.
        await abandon(actor, TASKS)
        await wait_for_dead_letters(learner, 1)
        (dead,) = await learner.dead_letters()
        assert dead.stage == TASKS.name
        assert (await learner.js.stream_info(TASKS.stream)).state.messages == 0

        # Rewarder: the real `aha rewarder` loop (verifier pool included), rollouts -> scored.
        from rewarder.config import RewarderConfig
        from rewarder.service import run as run_rewarder

        rewarder_config = RewarderConfig(workers=1, concurrency=1, bus=cfg["rewarder"])
        assert await run_rewarder(rewarder_config, asyncio.Event(), max_messages=1) == 0

        # Rewarder: garbage is dead-lettered, an abandoned rollout too (through its advisory).
        await actor.publish_bytes(ROLLOUTS.subject, b"\x00 not a rollout", msg_id="garbage")
        rollouts = StageConsumer(rewarder, ROLLOUTS)
        assert await rollouts.fetch(1, timeout=5) == []
        await rollouts.close()
        await actor.publish(ROLLOUTS, make_rollout(make_task(5)))
        await abandon(rewarder, ROLLOUTS)
        await wait_for_dead_letters(learner, 3)
        assert [d.stage for d in await learner.dead_letters()] == [
            TASKS.name,
            ROLLOUTS.name,
            ROLLOUTS.name,
        ]

        # Learner: the scored group, acknowledged once "checkpointed".
        scored = StageConsumer(learner, SCORED)
        (group,) = await scored.fetch(1, timeout=5)
        assert group.message.rollout.task.task_id == "task-0"
        assert [s.reward for s in group.message.scores] == [pytest.approx(1.1)] * 2
        await group.ack_sync()
        await scored.close()

        depth = await queue_depth(exporter.js)
        assert [depth[s].messages for s in ("tasks", "rollouts", "scored", "dead")] == [0, 0, 0, 3]
        for sub in (learner_advisories, actor_advisories, rewarder_advisories):
            await sub.unsubscribe()
    finally:
        for bus in (learner, actor, rewarder, exporter):
            await bus.close()
    assert violations(server) == set()


async def test_no_role_receives_the_replies_another_role_fetched(deployment, tmp_path):
    """The tasks an actor fetches and the weights it downloads come back on its reply inbox:
    the rewarder and exporter users, subscribed to every inbox they can think of, get none
    of it (each user may subscribe only to `_INBOX_<user>.>`, aha's prefix for that user)."""
    server, passwords = deployment
    cfg = {svc: role_config(server, svc, passwords) for svc in ROLES}
    learner = await Bus.connect(cfg["learner"], name="learner")
    actor = await Bus.connect(cfg["actor"], name="actor")
    spies = {}
    for role in ("rewarder", "exporter"):  # plain clients with the role's password
        spies[role] = await nats.connect(
            server.url, user=role, password=passwords[f"AHA_NATS_{role.upper()}_PASSWORD"]
        )
    overheard: dict[str, list[str]] = {role: [] for role in spies}
    guesses = ["_INBOX.>", f"{inbox_prefix('actor')}.>", f"{inbox_prefix('learner')}.>", ">"]
    try:
        for role, nc in spies.items():
            for subject in guesses:

                async def overhear(msg, role=role):
                    overheard[role].append(msg.subject)

                await nc.subscribe(subject, cb=overhear)
            await nc.flush()
        (tmp_path / "out").mkdir()
        manifest = await publish_weights_as_learner(learner, tmp_path / "out")
        await learner.publish(TASKS, make_task(0))
        tasks = StageConsumer(actor, TASKS)
        (delivery,) = await tasks.fetch(1, timeout=5)
        assert delivery.message.task_id == "task-0"
        await delivery.ack_sync()
        await tasks.close()
        paths = await download_shards(actor.js, manifest, tmp_path / "actor")
        assert paths[0].read_bytes() == (tmp_path / "out" / manifest.shards[0].name).read_bytes()
        await asyncio.sleep(0.2)
        assert overheard == {"rewarder": [], "exporter": []}
    finally:
        for nc in spies.values():
            await nc.close()
        for bus in (learner, actor):
            await bus.close()
    refused = {(user, subj) for user, kind, subj in violations(server) if kind == "Subscription"}
    assert refused == {(role, subject) for role in spies for subject in guesses}


async def test_a_generation_job_runs_as_the_jobs_user_and_cannot_touch_training(
    deployment, tmp_path
):
    """`aha generate --nats-url` as the `jobs` user: its tasks go through an actor and the real
    rewarder to its own consumer, the line is written, the consumer deleted, no violation. The
    same user is refused the learner's consumer and the training job's subject."""
    from pipeline.generate import Plan, collect
    from protocol.messages import Sampling
    from protocol.names import scored_subject
    from rewarder.config import RewarderConfig
    from rewarder.service import run as run_rewarder

    server, passwords = deployment
    cfg = {svc: role_config(server, svc, passwords) for svc in ROLES}
    learner = await Bus.connect(cfg["learner"], name="learner")  # creates the streams
    actor = await Bus.connect(cfg["actor"], name="actor")
    jobs = await Bus.connect(cfg["jobs"], name="jobs")
    out = tmp_path / "samples.jsonl"
    problems = [{"id": "a", "prompt": "Q:1+1=", "reference": "2"}]
    plan = Plan.of(
        "/models/m",
        problems,
        2,
        Sampling(),
        {"accuracy_math": 1.0},
        out,
        None,
        "eval-1",
        16,
        local=False,
    )
    try:
        job = asyncio.create_task(collect(plan, set(), cfg["jobs"], 4, False, embedded=False))

        async def generate(task):
            assert (task.job, task.model) == ("eval-1", "/models/m")
            return make_rollout(task)

        stop = asyncio.Event()
        assert (
            await run_stage(actor, TASKS, generate, output=ROLLOUTS, stop=stop, max_messages=1)
        ).handled == 1
        rewarder_config = RewarderConfig(workers=1, concurrency=1, bus=cfg["rewarder"])
        assert await run_rewarder(rewarder_config, asyncio.Event(), max_messages=1) == 0
        await asyncio.wait_for(job, 30)
        (line,) = [json.loads(x) for x in out.read_text().splitlines()]
        assert [s["reward"] for s in line["samples"]] == [1.0, 1.0]
        assert [s["answer"] for s in line["samples"]] == ["2", "2"]
        consumers = [c.name async for c in _consumers(learner, SCORED.stream)]
        assert consumers == [SCORED.durable]  # the job's own was deleted when it finished
        assert violations(server) == set()

        # The learner's groups stay the learner's.
        assert await StageConsumer(jobs, SCORED).fetch(1, timeout=0.5) == []  # refused
        with pytest.raises((NatsTimeoutError, asyncio.TimeoutError, APIError)):
            from protocol.streams import ensure_job_consumer

            await ensure_job_consumer(jobs.nc.jetstream(timeout=0.5), cfg["jobs"], "train")
    finally:
        for bus in (learner, actor, jobs):
            await bus.close()
    refused = {(user, subject) for user, _, subject in violations(server)}
    assert ("jobs", f"$JS.API.CONSUMER.MSG.NEXT.{SCORED.stream}.{SCORED.durable}") in refused
    train = f"$JS.API.CONSUMER.CREATE.{SCORED.stream}.{SCORED.durable}.{scored_subject('train')}"
    assert ("jobs", train) in refused


async def _consumers(bus: Bus, stream: str):
    for info in await bus.js.consumers_info(stream):
        yield info


async def _refused(bus: Bus, subject: str) -> None:
    with pytest.raises((NatsTimeoutError, asyncio.TimeoutError)):
        await bus.js.publish(subject, b"x", timeout=0.5)


async def test_roles_are_refused_outside_their_permissions(server, passwords):
    cfg = {svc: role_config(server, svc, passwords) for svc in ROLES}
    learner = await Bus.connect(cfg["learner"], name="learner")
    actor = await Bus.connect(cfg["actor"], name="actor")
    rewarder = await Bus.connect(cfg["rewarder"], name="rewarder")
    exporter = await Bus.connect(cfg["exporter"], name="exporter")
    try:
        # Publishing into a stage that is not yours: refused, nothing reaches the stream.
        await _refused(actor, SCORED.subject)
        await _refused(actor, TASKS.subject)
        await _refused(rewarder, TASKS.subject)
        await _refused(rewarder, ROLLOUTS.subject)
        await _refused(exporter, TASKS.subject)
        for stage in (TASKS, SCORED):
            assert (await learner.js.stream_info(stage.stream)).state.messages == 0

        # Only the learner manages JetStream or writes weights.
        for bus in (actor, rewarder, exporter):
            with pytest.raises((NatsTimeoutError, asyncio.TimeoutError, APIError)):
                await bus.nc.jetstream(timeout=0.5).delete_stream(TASKS.stream)
        await _refused(actor, f"$KV.{KV_POLICY}.{KEY_LATEST}")
        with pytest.raises((NatsTimeoutError, asyncio.TimeoutError)):
            await rewarder.nc.jetstream(timeout=0.5).key_value(KV_POLICY)

        # A locked-down role that tries to set up streams cannot even start.
        with pytest.raises((NatsTimeoutError, asyncio.TimeoutError, APIError)):
            await Bus.connect(
                cfg["rewarder"].model_copy(update={"setup_streams": True, "connect_timeout_s": 1}),
                name="rewarder-setup",
            )

        # Reading another stage's queue is refused too.
        received = []

        async def receive(msg):
            received.append(msg)

        sub = await rewarder.nc.subscribe(TASKS.subject, cb=receive)
        await learner.publish(TASKS, make_task(7))
        await asyncio.sleep(0.2)
        assert received == []
        await sub.unsubscribe()
    finally:
        for bus in (learner, actor, rewarder, exporter):
            await bus.close()
    stream_delete = f"$JS.API.STREAM.DELETE.{TASKS.stream}"
    assert violations(server) >= {
        ("actor", "Publish", SCORED.subject),
        ("actor", "Publish", TASKS.subject),
        ("rewarder", "Publish", TASKS.subject),
        ("rewarder", "Publish", ROLLOUTS.subject),
        ("exporter", "Publish", TASKS.subject),
        ("actor", "Publish", stream_delete),
        ("rewarder", "Publish", stream_delete),
        ("exporter", "Publish", stream_delete),
        ("actor", "Publish", f"$KV.{KV_POLICY}.{KEY_LATEST}"),
        ("rewarder", "Publish", f"$JS.API.STREAM.INFO.{KV_POLICY_STREAM}"),
        ("rewarder", "Publish", f"$JS.API.STREAM.INFO.{TASKS.stream}"),
        ("rewarder", "Subscription", TASKS.subject),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


@pytest.mark.slow
async def test_compose_services_run_as_local_processes(server, passwords, tiny_model_dir, tmp_path):
    """nats-setup, actor, rewarder and exporter run their compose command with their compose
    environment (NATS URL, metrics ports, model path, engine and worker count adapted to this
    machine): weights and a task published with the learner's user go through the real
    actor and rewarder processes, and the scored group reaches the learner's user.

    The learner process is played by the test (its user, its code for weights): a learner
    run needs a dataset and model the tiny one cannot serve under the compose config; the
    loop itself is tested in tests/integration with open NATS.
    """
    from transformers import AutoModelForCausalLM

    from learner.weights import publish_weights, version_dir, write_shards

    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    aha = [sys.executable, "-m", "deploy.cli"]

    def command(service: str, port: int | None = None) -> list[str]:
        args = [
            a.replace("/etc/aha/aha.toml", str(DEPLOY / "aha.toml"))
            for a in services[service]["command"]
        ]
        if port is not None:  # the metrics port is the command's numeric argument
            args = [str(port) if a.isdigit() else a for a in args]
        return aha + args

    def environment(service: str, **extra: str) -> dict[str, str]:
        env = {**os.environ, **service_environment(service, passwords), **extra}
        local = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        return {**env, **local, "NATS_URL": server.url}

    setup = await asyncio.to_thread(
        subprocess.run,
        command("nats-setup"),
        env=environment("nats-setup"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert setup.returncode == 0, setup.stderr
    assert set(json.loads(setup.stdout.splitlines()[-1])) == {"tasks", "rollouts", "scored", "dead"}

    # The learner's part: version 1 of the weights, through the object store.
    learner_config = role_config(server, "learner", passwords)
    learner = await Bus.connect(learner_config.model_copy(update={"setup_streams": False}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    directory, shared = version_dir(None, 1)
    shards = write_shards(model, directory, "float32", shard_mb=0.2, shared=shared)
    await publish_weights(
        learner.js, directory, shards, version=1, step=1, dtype="float32", keep_versions=2
    )

    ports = {name: _free_port() for name in ("actor", "rewarder", "exporter")}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ports}
    procs = {
        "actor": subprocess.Popen(
            command("actor"),
            env=environment(
                "actor",
                AHA_ACTOR__MODEL=str(tiny_model_dir),
                AHA_ACTOR__BACKEND="hf",
                AHA_ACTOR__METRICS_PORT=str(ports["actor"]),
            ),
            stdout=logs["actor"],
            stderr=subprocess.STDOUT,
        ),
        "rewarder": subprocess.Popen(
            command("rewarder", ports["rewarder"]),
            env=environment("rewarder", AHA_REWARDER__WORKERS="1"),
            stdout=logs["rewarder"],
            stderr=subprocess.STDOUT,
        ),
        "exporter": subprocess.Popen(
            command("exporter", ports["exporter"]),
            env=environment("exporter"),
            stdout=logs["exporter"],
            stderr=subprocess.STDOUT,
        ),
    }
    try:
        task = make_task(0, group_size=2, sampling=Sampling(max_tokens=8))
        await learner.publish(TASKS, task)
        scored = StageConsumer(learner, SCORED)
        deliveries = []
        for _ in range(180):  # the processes load a model and a verifier pool first
            deliveries = await scored.fetch(1, timeout=1)
            if deliveries or any(p.poll() is not None for p in procs.values()):
                break
        assert deliveries, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in procs}
        (group,) = deliveries
        assert group.message.rollout.task.task_id == task.task_id
        assert group.message.rollout.policy_version == 1
        for _ in range(100):
            if 'aha_queue_ack_pending{stage="scored"} 1.0' in _metrics(ports["exporter"]):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the exporter never reported the scored group in flight")
        assert "aha_rewarder_completions_total 2.0" in _metrics(ports["rewarder"])
        assert "aha_actor_policy_version" in _metrics(ports["actor"])
        await group.ack_sync()
        await scored.close()
    finally:
        await learner.close()
        shutil.rmtree(directory, ignore_errors=True)
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(procs, 0)
    assert violations(server) == set()


CONTAINER = r"""
set -e
# compose's confinement on this host: every mount read-only but $WRITABLE (colon-separated;
# the tmpfs compose gives, and the test's stand-ins for volumes) and /proc, /dev; the bounding
# set (so, for root, the capabilities) reduced to the service's cap_add; no_new_privs.
caps=$1; shift
IFS=:
for w in $WRITABLE; do mount --bind "$w" "$w"; done
unset IFS
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  case ":$WRITABLE:" in *":$m:"*) continue ;; esac
  case "$m" in /proc|/proc/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="-all$caps" -- "$@"
"""


def contained(service: dict, argv: list[str], home: Path) -> tuple[list[str], dict[str, str]]:
    """`argv` under `service`'s compose confinement where this host can build it (root, mount
    namespaces), and the environment to add: read-only root, tmpfs paths writable (/tmp here
    also holds the test's volumes), $HOME only where compose mounts a tmpfs on it, and no
    capabilities but its cap_add."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return argv, {}
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        return argv, {}
    tmpfs = {t.split(":")[0] for t in service.get("tmpfs", [])}
    writable, env = [], {}
    if "/tmp" in tmpfs:
        writable.append("/tmp")
    if "/home/aha" in tmpfs:
        home.mkdir(exist_ok=True)
        env["HOME"] = str(home)  # under /tmp: writable
    caps = "".join(f",+{c.lower()}" for c in service.get("cap_add", []))
    env["WRITABLE"] = ":".join(writable)
    wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CONTAINER]
    return [*wrap, "container", caps, *argv], env


@pytest.mark.slow
async def test_the_loop_runs_with_every_part_under_its_own_user(
    server, passwords, tiny_model_dir, tmp_path
):
    """The learner, an actor and a rewarder as real processes with their compose command and
    environment (their own NATS users), the compose config file refined for this machine, and
    (where this host can build it) the confinement compose gives each container: read-only
    root, writable only its tmpfs, only the capabilities it adds, no-new-privileges. Two GRPO
    steps go round the whole loop and no permission is violated."""
    import tomli_w

    from pipeline.demo import rl_prompts, write_jsonl
    from protocol.config import merge, read_file

    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    dataset = write_jsonl(rl_prompts(64, seed=0, exclude=set()), tmp_path / "rl.jsonl")
    local = {
        "learner": {
            "model": {"path": str(tiny_model_dir)},
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "weights_dir": str(tmp_path / "weights"),
            "final_model_dir": str(tmp_path / "final"),
            "metrics_file": str(tmp_path / "metrics.jsonl"),
            "metrics_port": _free_port(),
            "batch": 2,
            "max_steps": 2,
            "serving_dtype": "float32",
            "deepspeed": {"precision": "fp32", "micro_batch": 4},
            "dataset": {
                "path": str(dataset),
                "prompt_field": "prompt",
                "template": "none",
                "group_size": 2,
                "max_tokens": 8,
                "meta": {"answer_tag": True},
            },
        },
        "actor": {"model": str(tiny_model_dir), "backend": "hf", "metrics_port": _free_port()},
        "rewarder": {"workers": 1},
    }
    config = tmp_path / "aha.toml"
    config.write_text(tomli_w.dumps(merge(read_file(DEPLOY / "aha.toml"), local)))

    def start(service: str) -> subprocess.Popen:
        args = [
            str(config) if a == "/etc/aha/aha.toml" else a for a in services[service]["command"]
        ]
        args = [a for a in args if not a.isdigit() and a != "--metrics-port"]  # ports: config
        env = {
            **os.environ,
            **service_environment(service, passwords),
            "NATS_URL": server.url,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu",
        }
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        argv, confinement = contained(
            services[service], [sys.executable, "-m", "deploy.cli", *args], tmp_path / "home"
        )
        log = open(tmp_path / f"{service}.log", "w")
        return subprocess.Popen(
            argv, env={**env, **confinement}, stdout=log, stderr=subprocess.STDOUT
        )

    # As in compose: the one-shot set-up first (the actor and rewarder may not create
    # streams or buckets), then every part.
    setup = start("nats-setup")
    assert await asyncio.to_thread(setup.wait, 120) == 0, (tmp_path / "nats-setup.log").read_text()
    learner = start("learner")
    parts = {"actor": start("actor"), "rewarder": start("rewarder")}
    try:
        code = await asyncio.to_thread(learner.wait, 300)
    finally:
        if learner.poll() is None:
            learner.kill()
        for p in parts.values():
            p.send_signal(signal.SIGTERM)
        for p in parts.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("learner", *parts)}
    assert code == 0, logs
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["event"] == "step"] == [1, 2]
    assert (tmp_path / "final" / "config.json").exists()
    assert {n: p.returncode for n, p in parts.items()} == {"actor": 0, "rewarder": 0}, logs
    assert violations(server) == set()


async def test_a_user_name_that_cannot_name_an_inbox_is_refused_in_one_line(server):
    config = BusConfig(url=server.url, user="actor *", password="x", setup_streams=False)
    with pytest.raises(ValueError, match=r"^bus.user 'actor \*' cannot name its reply subjects"):
        await Bus.connect(config)
