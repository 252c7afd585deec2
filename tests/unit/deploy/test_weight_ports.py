"""The weight server (protocol/weight_server.py) in compose and the Helm chart: learner and
actors serve on its port, actors reach it on the learner and on each other, nobody else does."""

from __future__ import annotations

import pytest

from actors.config import ActorConfig
from learner.config import LearnerConfig
from protocol.config import load_config
from protocol.weight_server import WeightServerConfig
from tests.unit.deploy.test_compose import compose_config

PORT = 8471


def test_compose_learner_and_actors_reach_each_other_on_its_one_network():
    """Compose has no network policy: learner and actors share its default network, so the
    weight server needs no fixed port (a fixed one would clash where the services run as
    local processes, as test_nats_permissions.py runs them); it takes a free port and is
    advertised at the container's own address."""
    services = compose_config("compose.yaml")["services"]
    for name in ("learner", "actor"):
        assert set(services[name].get("networks") or {"default": None}) == {"default"}, name
        assert not [k for k in services[name]["environment"] if "WEIGHT_SERVER" in k], name
    default = WeightServerConfig()
    assert default.enabled and default.port == 0 and default.advertise is None


helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the dev extra)")


def policies(values: dict) -> dict[str, dict]:
    from tests.unit.deploy.test_helm import component, of_kind, render

    return {component(d): d["spec"] for d in of_kind(render(values), "NetworkPolicy").values()}


def pods(selector_components: list[str]) -> list[dict]:
    labels = {"app.kubernetes.io/name": "aha", "app.kubernetes.io/instance": "aha"}
    return [
        {"podSelector": {"matchLabels": {**labels, "app.kubernetes.io/component": c}}}
        for c in selector_components
    ]


def test_helm_opens_the_weight_port_between_actors_and_to_the_learner_only():
    rule_ports = [{"port": PORT, "protocol": "TCP"}]
    on = policies({})
    # Ingress to the weight port: from actors, on the learner and on actors.
    for role in ("learner", "actor"):
        assert {"from": pods(["actor"]), "ports": rule_ports} in on[role]["ingress"], role
    # Egress to it: actors only, to the learner and to other actors.
    assert {"to": pods(["learner", "actor"]), "ports": rule_ports} in on["actor"]["egress"]
    for role, policy in on.items():
        if role == "nats":
            continue
        reach = [r for r in policy["egress"] if r.get("ports") == rule_ports]
        assert bool(reach) == (role == "actor"), role
        opened = [r for r in policy.get("ingress", []) if r.get("ports") == rule_ports]
        assert bool(opened) == (role in ("learner", "actor")), role
    # Turned off, the port is gone from every policy.
    off = policies({"weightServer": {"enabled": False}})
    assert str(PORT) not in str(off)


def test_helm_pods_serve_weights_at_their_own_address(tmp_path):
    from tests.unit.deploy.test_helm import env_of, of_kind, pod_specs, render

    docs = render({"weightServer": {"port": 9000, "fanout": 3}})
    specs = pod_specs(docs)
    # the config the pods load (the chart's ConfigMap) with their environment
    config = of_kind(docs, "ConfigMap")["aha-config"]["data"]["aha.toml"]
    (tmp_path / "aha.toml").write_text(config)
    for role, model in (("learner", LearnerConfig), ("actor", ActorConfig)):
        env = env_of(specs[role])
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        container = specs[role]["containers"][0]
        assert {"name": "weights", "containerPort": 9000} in container["ports"]
        plain = {k: e["value"] for k, e in env.items() if "value" in e}
        # Kubernetes expands $(POD_IP); the config is what the part reads after that.
        plain = {k: v.replace("$(POD_IP)", "10.1.2.3") for k, v in plain.items()}
        plain = {k: v for k, v in plain.items() if "WEIGHT_SERVER" in k}
        config = load_config(model, tmp_path / "aha.toml", section=role, environ=plain)
        server = config.weight_server
        assert (server.enabled, server.port, server.fanout) == (True, 9000, 3)
        assert server.advertise == "http://10.1.2.3:9000"
