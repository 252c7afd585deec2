"""The Helm chart (deploy/helm/aha): lint, render, validate against the Kubernetes schemas,
and check what the deployment promises — KEDA and NATS permissions name exactly the streams,
consumers and subjects of protocol/names.py, only learner and actors get GPUs, each part
scales on its own, rewarders reach nothing but NATS, every container has a read-only root and
no capabilities (but the rewarder sandbox's), the NATS pods take clients only from aha's pods
and monitoring only from the exporter, and an upgrade keeps the passwords.

helm-python-sdk embeds Helm's library (no helm binary); kubernetes-validate ships the
schemas. The NATS chart dependency is not vendored: `helm lint` warns that charts/ lacks it,
and rendering does not need it.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from protocol.names import (
    KV_POLICY,
    OBJECT_STORE_WEIGHTS,
    ROLLOUTS,
    SCORED,
    STAGES,
    STREAM_DEAD,
    SUBJECT_SCORED,
    TASKS,
    Stage,
    inbox_prefix,
)
from tests.unit.deploy.test_compose import SANDBOX_CAPABILITIES, load_every_section

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the dev extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
CHART = DEPLOY / "helm" / "aha"
KUBE_VERSION = "1.33"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
"""Custom resources: no schema in kubernetes-validate; checked field by field below."""

EXTERNAL_NATS = {
    "nats": {
        "enabled": False,
        "url": "tls://nats.infra:4222",
        "monitoringEndpoint": "nats.infra:8222",
    },
    "networkPolicy": {"externalNatsPeers": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
    "tls": {"enabled": True, "caSecret": "nats-ca", "clientSecret": "aha-client-tls"},
}
VALUES = {
    "default": {},
    "scaled": {"actor": {"replicas": 7}, "rewarder": {"replicas": 3, "workers": 8}},
    "autoscaled": {
        "autoscaling": {"enabled": True},
        "monitoring": {"podMonitor": {"enabled": True}},
    },
    "external-nats-tls-shared-weights": {**EXTERNAL_NATS, "sharedWeights": {"enabled": True}},
    "cpu-only": {
        "learner": {"engine": "cpu"},
        "actor": {"engine": "cpu"},
        "rewarder": {"namespaceSandbox": False},
    },
    "multi-node": {"learner": {"nodes": 2, "gpus": 8}, "actor": {"gpus": 4}},
}


NATS_POD_LABELS = {
    "app.kubernetes.io/name": "nats",
    "app.kubernetes.io/instance": "aha",
    "app.kubernetes.io/component": "nats",
}
"""The NATS chart's selector labels of its server pods (release `aha`; nats-box is another
component)."""
MONITORING_NAMESPACE = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
}


def render(values: dict) -> list[dict]:
    """Every manifest the chart renders with `values` (release `aha`, namespace `rl`)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        files = chart.render(values, name="aha", namespace="rl", is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """component -> pod spec, for every workload."""
    return {
        component(d): d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def env_of(spec: dict) -> dict[str, dict]:
    return {e["name"]: e for e in spec["containers"][0]["env"]}


# -- the wire names, from protocol/names.py ----------------------------------------------------

ADVISORY = TASKS.max_deliveries_advisory.rsplit(".", 2)[0]
KV_STREAM = f"KV_{KV_POLICY}"
OBJ_STREAM = f"OBJ_{OBJECT_STORE_WEIGHTS}"


def _consumes(stage: Stage) -> list[str]:
    return [
        f"$JS.API.CONSUMER.MSG.NEXT.{stage.stream}.{stage.durable}",
        f"$JS.ACK.{stage.stream}.{stage.durable}.>",
        f"$JS.API.STREAM.MSG.GET.{stage.stream}",
        f"$JS.API.STREAM.MSG.DELETE.{stage.stream}",
    ]


def replies(user: str) -> str:
    """The inbox subjects `user` may subscribe to: its own only (aha connects with that prefix)."""
    return f"{inbox_prefix(user)}.>"


def expected_permissions() -> dict[str, dict[str, list[str]]]:
    """Each role's NATS permissions, spelled from protocol/names.py (why each: deploy/nats/nats.conf)."""
    assert ADVISORY == "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
    reads_weights = [
        f"$JS.API.STREAM.INFO.{KV_STREAM}",
        f"$JS.API.STREAM.MSG.GET.{KV_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{KV_STREAM}",
        f"$JS.API.CONSUMER.INFO.{KV_STREAM}.*",
        f"$JS.FC.{KV_STREAM}.>",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.STREAM.INFO.{OBJ_STREAM}",
        f"$JS.API.STREAM.MSG.GET.{OBJ_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{OBJ_STREAM}",
        f"$JS.FC.{OBJ_STREAM}.>",
    ]
    return {
        "learner": {
            "publish": [
                "$JS.API.>",
                f"$JS.ACK.{SCORED.stream}.{SCORED.durable}.>",
                "$JS.FC.>",
                f"$KV.{KV_POLICY}.>",
                f"$O.{OBJECT_STORE_WEIGHTS}.>",
                TASKS.subject,
                SCORED.dead_subject,
            ],
            "subscribe": [replies("learner"), SCORED.max_deliveries_advisory],
        },
        "actor": {
            "publish": [*_consumes(TASKS), ROLLOUTS.subject, TASKS.dead_subject, *reads_weights],
            "subscribe": [replies("actor"), TASKS.max_deliveries_advisory],
        },
        "rewarder": {
            "publish": [*_consumes(ROLLOUTS), SCORED.stream_subjects, ROLLOUTS.dead_subject],
            "subscribe": [replies("rewarder"), ROLLOUTS.max_deliveries_advisory],
        },
        "jobs": {
            "publish": [
                f"$JS.API.CONSUMER.CREATE.{SCORED.stream}.*.{SUBJECT_SCORED}.*",
                f"$JS.API.CONSUMER.DELETE.{SCORED.stream}.*",
                f"$JS.API.CONSUMER.MSG.NEXT.{SCORED.stream}.*",
                f"$JS.ACK.{SCORED.stream}.*.>",
                *(f"$JS.API.STREAM.INFO.{s.stream}" for s in STAGES.values()),
                f"$JS.API.STREAM.INFO.{KV_STREAM}",
                f"$JS.API.STREAM.INFO.{STREAM_DEAD}",
                f"$JS.API.STREAM.MSG.GET.{STREAM_DEAD}",
                TASKS.subject,
                SCORED.dead_subject,
            ],
            "deny": [  # the learner's consumer and the training job's subject
                f"$JS.API.CONSUMER.CREATE.{SCORED.stream}.{SCORED.durable}.>",
                f"$JS.API.CONSUMER.CREATE.{SCORED.stream}.*.{SCORED.subject}",
                f"$JS.API.CONSUMER.DELETE.{SCORED.stream}.{SCORED.durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{SCORED.stream}.{SCORED.durable}",
                f"$JS.ACK.{SCORED.stream}.{SCORED.durable}.>",
            ],
            "subscribe": [replies("jobs")],
        },
        "exporter": {
            "publish": [f"$JS.API.STREAM.INFO.{s.stream}" for s in STAGES.values()]
            + [f"$JS.API.STREAM.INFO.{STREAM_DEAD}"]
            + [f"$JS.API.CONSUMER.INFO.{s.stream}.{s.durable}" for s in STAGES.values()],
            "subscribe": [replies("exporter")],
        },
    }


def users_of(conf: dict) -> dict[str, dict[str, list[str]]]:
    users = {}
    for u in conf["authorization"]["users"]:
        perms = u["permissions"]
        users[u["user"]] = {k: perms[k]["allow"] for k in ("publish", "subscribe")}
        if "deny" in perms["publish"]:
            users[u["user"]]["deny"] = perms["publish"]["deny"]
        assert "deny" not in perms["subscribe"]
    return users


def compose_nats_conf() -> dict:
    """deploy/nats/nats.conf as data: JSON once comments go and $VARIABLES are quoted."""
    lines = [
        line
        for line in (DEPLOY / "nats" / "nats.conf").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    return json.loads(re.sub(r"(?<![\"\w])(\$[A-Z_]+)", r'"\1"', "\n".join(lines)))


def helm_nats_auth(docs: list[dict]) -> tuple[dict, dict[str, str]]:
    (secret,) = of_kind(docs, "Secret").values()
    data = secret["stringData"]
    return json.loads(data["auth.conf"]), data


# -- tests -------------------------------------------------------------------------------------


def test_chart_lints_with_only_the_missing_nats_dependency_as_a_warning():
    for values in VALUES.values():
        report = helm.lint(CHART, values)
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert [m["error"] for m in problems] == [
            "chart directory is missing these dependencies: nats"
        ]
    with helm.Chart.load(CHART) as chart:
        (dep,) = chart.metadata["dependencies"]
        assert dep["name"] == "nats" and dep["condition"] == "nats.enabled"


@pytest.mark.parametrize("name", list(VALUES))
def test_every_rendered_manifest_is_valid_kubernetes(name):
    docs = render(VALUES[name])
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            assert doc["kind"] in ("ScaledObject", "PodMonitor")
            assert doc["metadata"]["name"] and doc["spec"]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}") from e


def test_values_schema_refuses_bad_values():
    with helm.Chart.load(CHART) as chart:
        for bad in (
            {"actor": {"replicas": -1}},
            {"rewarder": {"gpus": 1}},  # rewarders never get GPUs
            {"learner": {"engine": "tpu"}},
            {"learner": {"nodes": 0}},
            {"learner": {"collectivePorts": {"from": 80, "to": 90}}},
            {"autoscaling": {"enabled": "yes"}},
            {"unknown": 1},
        ):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_keda_scales_actors_and_rewarders_on_their_consumers_lag():
    assert of_kind(render({}), "ScaledObject") == {}  # off by default
    docs = render(VALUES["autoscaled"])
    scaled = {component(d): d for d in of_kind(docs, "ScaledObject").values()}
    assert set(scaled) == {"actor", "rewarder"}
    deployments = of_kind(docs, "Deployment")
    for role, stage in (("actor", TASKS), ("rewarder", ROLLOUTS)):
        spec = scaled[role]["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert (meta["stream"], meta["consumer"]) == (stage.stream, stage.durable)
        assert meta["account"] == "$G"
        assert meta["natsServerMonitoringEndpoint"] == "aha-nats.rl.svc:8222"
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert component(target) == role
        assert "replicas" not in target["spec"]  # KEDA owns the count
    external = render({**EXTERNAL_NATS, "autoscaling": {"enabled": True}})
    for so in of_kind(external, "ScaledObject").values():
        assert (
            so["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
            == "nats.infra:8222"
        )


def test_nats_permissions_name_exactly_the_protocol_names():
    expected = expected_permissions()
    helm_conf, data = helm_nats_auth(render({}))
    for conf in (helm_conf, compose_nats_conf()):
        users = users_of(conf)
        assert list(users) == ["learner", "actor", "rewarder", "jobs", "exporter"]
        for role, perms in expected.items():
            assert set(users[role]) == set(perms), role
            for kind in perms:
                got = users[role][kind]
                assert len(got) == len(set(got)), (role, kind)
                assert sorted(got) == sorted(perms[kind]), (role, kind)
    # Each role's password is in the Secret and in auth.conf; the compose file takes them
    # from its environment.
    for user in helm_conf["authorization"]["users"]:
        assert user["password"] == data[f"{user['user']}-password"]
        assert len(user["password"]) >= 32
    for user in compose_nats_conf()["authorization"]["users"]:
        assert user["password"] == f"$AHA_NATS_{user['user'].upper()}_PASSWORD"
    # Nothing but the learner may touch JetStream administration or another stage's input.
    stage_subjects = {s.subject for s in STAGES.values()}
    for role in ("actor", "rewarder", "jobs", "exporter"):
        publish = expected[role]["publish"]
        assert "$JS.API.>" not in publish
        assert not any(
            p.startswith(
                (
                    "$JS.API.STREAM.CREATE",
                    "$JS.API.STREAM.UPDATE",
                    "$JS.API.STREAM.DELETE",
                    "$KV.",
                    "$O.",
                )
            )
            for p in publish
        )
        assert len(stage_subjects & set(publish)) <= 1


def test_only_learner_and_actor_pods_request_gpus():
    for name, values in VALUES.items():
        docs = render(values)
        gpus = {}
        for role, spec in pod_specs(docs).items():
            for c in spec["containers"] + spec.get("initContainers", []):
                res = c.get("resources", {})
                n = {**res.get("requests", {}), **res.get("limits", {})}.get("nvidia.com/gpu")
                if n:
                    gpus[role] = n
        if name == "cpu-only":
            assert gpus == {}
        elif name == "multi-node":
            assert gpus == {"learner": 8, "actor": 4}
        else:
            assert gpus == {"learner": 1, "actor": 1}, name
    docs = render({"learner": {"gpus": 8}, "actor": {"gpus": 2}})
    specs = pod_specs(docs)
    assert specs["learner"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert specs["actor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_replica_counts_are_independent():
    def counts(values):
        docs = render(values)
        out = {
            component(d): d["spec"].get("replicas")
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
        }
        return out

    assert counts({}) == {"learner": 1, "actor": 2, "rewarder": 2, "exporter": 1}
    assert counts(VALUES["scaled"]) == {"learner": 1, "actor": 7, "rewarder": 3, "exporter": 1}
    assert counts({"actor": {"replicas": 0}}) == {
        "learner": 1,
        "actor": 0,
        "rewarder": 2,
        "exporter": 1,
    }
    assert counts({"rewarder": {"replicas": 12}})["actor"] == 2


def test_each_pod_connects_as_its_own_user_and_only_the_learner_sets_up_streams():
    docs = render(VALUES["external-nats-tls-shared-weights"])
    roles = {
        "learner": "learner",
        "setup": "learner",
        "actor": "actor",
        "rewarder": "rewarder",
        "exporter": "exporter",
    }
    specs = pod_specs(docs)
    assert set(specs) == set(roles)
    for comp, user in roles.items():
        env = env_of(specs[comp])
        assert env["NATS_URL"]["value"] == "tls://nats.infra:4222"
        assert env["AHA_BUS__USER"]["value"] == user
        ref = env["AHA_BUS__PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "aha-nats-auth", "key": f"{user}-password"}
        setup = env.get("AHA_BUS__SETUP_STREAMS", {}).get("value")
        assert setup == (None if user == "learner" else "false"), comp
        assert env["AHA_BUS__TLS_CA_FILE"]["value"] == "/etc/aha/tls/ca/ca.crt"
    assert specs["setup"]["containers"][0]["args"][:2] == ["top", "--once"]
    assert env_of(specs["learner"])["AHA_LEARNER__WEIGHTS_DIR"]["value"] == "/shared/weights"
    assert list(of_kind(docs, "Secret")) == ["aha-nats-auth"]  # unless auth.existingSecret
    existing = render(
        {**VALUES["external-nats-tls-shared-weights"], "auth": {"existingSecret": "mine"}}
    )
    assert of_kind(existing, "Secret") == {}
    ref = env_of(pod_specs(existing)["actor"])["AHA_BUS__PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mine", "key": "actor-password"}


def test_rewarders_reach_only_nats_and_dns():
    for values in (VALUES["default"], VALUES["external-nats-tls-shared-weights"]):
        docs = render(
            {
                **values,
                "networkPolicy": {
                    **values.get("networkPolicy", {}),
                    "extraEgress": {
                        "learner": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
                        "actor": [],
                    },
                },
            }
        )
        policies = {component(d): d["spec"] for d in of_kind(docs, "NetworkPolicy").values()}
        aha = {"learner", "actor", "rewarder", "exporter", "setup"}
        assert set(policies) == (aha | {"nats"} if values is VALUES["default"] else aha)
        rewarder = policies["rewarder"]
        assert rewarder["policyTypes"] == ["Ingress", "Egress"]
        nats_rule, dns_rule = rewarder["egress"]
        assert nats_rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
        assert {p["port"] for p in dns_rule["ports"]} == {53}
        assert rewarder["ingress"] == [
            {"from": [MONITORING_NAMESPACE], "ports": [{"port": "metrics", "protocol": "TCP"}]}
        ]
        assert len(policies["learner"]["egress"]) == 3  # + the extra rule asked for
    nats_peer = render({})
    (peer,) = next(
        p for p in of_kind(nats_peer, "NetworkPolicy").values() if component(p) == "rewarder"
    )["spec"]["egress"][0]["to"]
    assert peer == {"podSelector": {"matchLabels": NATS_POD_LABELS}}


def test_rewarder_gets_what_the_sandbox_needs_and_nothing_more():
    specs = pod_specs(render({}))
    rewarder = specs["rewarder"]
    sc = rewarder["containers"][0]["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == SANDBOX_CAPABILITIES  # as compose: the same set
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    # The runtime's default seccomp profile, which allows mount/unshare with CAP_SYS_ADMIN.
    assert rewarder["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    assert rewarder["securityContext"]["runAsUser"] == 0
    assert rewarder["automountServiceAccountToken"] is False
    for role in ("learner", "actor", "exporter", "setup"):
        assert specs[role]["securityContext"]["runAsNonRoot"] is True
        assert specs[role]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    plain = pod_specs(render(VALUES["cpu-only"]))["rewarder"]
    assert plain["securityContext"]["runAsNonRoot"] is True
    assert plain["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_learner_is_a_statefulset_with_a_checkpoint_volume_and_pdbs_cover_actors_and_rewarders(
    tmp_path,
):
    docs = render({})
    (learner,) = of_kind(docs, "StatefulSet").values()
    (claim,) = learner["spec"]["volumeClaimTemplates"]
    mounts = {
        m["name"]: m["mountPath"]
        for m in learner["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts[claim["metadata"]["name"]] == "/checkpoints"
    config = of_kind(docs, "ConfigMap")["aha-config"]["data"]["aha.toml"]
    assert 'checkpoint_dir = "/checkpoints"' in config
    (tmp_path / "aha.toml").write_text(config)
    load_every_section(tmp_path / "aha.toml")
    for role in ("learner", "actor"):  # metrics ports: one value, env and container port
        (container,) = pod_specs(docs)[role]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
        assert env[f"AHA_{role.upper()}__METRICS_PORT"] == str(port)
    assert {component(d) for d in of_kind(docs, "PodDisruptionBudget").values()} == {
        "actor",
        "rewarder",
    }
    assert of_kind(docs, "PodMonitor") == {}
    (monitor,) = of_kind(render(VALUES["autoscaled"]), "PodMonitor").values()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_dashboard_configmap_holds_the_generated_dashboard():
    from deploy.monitoring.dashboard import render as dashboard

    docs = render({})
    (cm,) = [d for d in of_kind(docs, "ConfigMap").values() if "aha.json" in d["data"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["aha.json"]) == json.loads(dashboard())


def test_every_container_has_a_read_only_root_and_no_capabilities():
    """Under every set of values: read-only root, ALL capabilities dropped (the rewarder adds
    back its sandbox's few), no privilege escalation but for it, the runtime's seccomp profile,
    and a writable emptyDir wherever a part writes."""
    for name, values in VALUES.items():
        sandbox = values.get("rewarder", {}).get("namespaceSandbox", True)
        for role, spec in pod_specs(render(values)).items():
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c["securityContext"]
                where = (name, role, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert not sc.get("privileged"), where
                if role == "rewarder" and sandbox:
                    assert set(sc["capabilities"]["add"]) == SANDBOX_CAPABILITIES
                else:
                    assert "add" not in sc["capabilities"], where
                    assert sc["allowPrivilegeEscalation"] is False, where
                    assert spec["securityContext"]["runAsNonRoot"] is True, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            scratch = {  # the learner's checkpoints: its StatefulSet's volume claim
                m["mountPath"]: volumes.get(m["name"], {"volumeClaimTemplate": m["name"]})
                for m in spec["containers"][0]["volumeMounts"]
                if not m.get("readOnly")
            }
            expected = {
                "learner": {"/tmp", "/home/aha", "/dev/shm", "/checkpoints"},
                "actor": {"/tmp", "/home/aha", "/dev/shm"},
                "rewarder": {"/tmp"},
                "exporter": set(),
                "setup": set(),
            }[role]
            if role == "learner" and values.get("sharedWeights", {}).get("enabled"):
                expected |= {"/shared/weights"}
            assert set(scratch) == expected, where
            for path, volume in scratch.items():
                assert "emptyDir" in volume or path in ("/checkpoints", "/shared/weights"), path
    # The NATS chart's pods (not vendored: its values, which its templates merge into the
    # server and reloader containers and the pod spec).
    with helm.Chart.load(CHART) as chart:
        nats = chart.values["nats"]
    locked = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert nats["container"]["merge"]["securityContext"] == locked
    assert nats["reloader"]["merge"]["securityContext"] == locked
    seccomp = nats["podTemplate"]["merge"]["spec"]["securityContext"]["seccompProfile"]
    assert seccomp == {"type": "RuntimeDefault"}


def test_nats_pods_take_clients_from_aha_pods_and_monitoring_from_the_exporter():
    def nats_policy(values):
        docs = of_kind(render(values), "NetworkPolicy")
        return {component(d): d["spec"] for d in docs.values()}.get("nats")

    policy = nats_policy({})
    # It selects the NATS chart's server pods, as the aha pods' egress rules do.
    assert policy["podSelector"] == {"matchLabels": NATS_POD_LABELS}
    assert policy["policyTypes"] == ["Ingress"]
    aha = {"app.kubernetes.io/name": "aha", "app.kubernetes.io/instance": "aha"}
    exporter = {**aha, "app.kubernetes.io/component": "exporter"}
    by_port = {r["ports"][0]["port"]: r["from"] for r in policy["ingress"]}
    assert all(len(r["ports"]) == 1 for r in policy["ingress"])
    assert by_port == {
        4222: [{"podSelector": {"matchLabels": aha}}],
        8222: [{"podSelector": {"matchLabels": exporter}}],
        6222: [{"podSelector": {"matchLabels": NATS_POD_LABELS}}],
    }
    # With KEDA, its operator reads the monitoring port too (configurable namespace).
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "autoscalers"}}}
    scaled = nats_policy({"autoscaling": {"enabled": True}, "networkPolicy": {"kedaFrom": [keda]}})
    monitoring = next(r["from"] for r in scaled["ingress"] if r["ports"][0]["port"] == 8222)
    assert monitoring[1:] == [keda]
    # The exporter's own egress allows the monitoring port; no other aha pod's does.
    policies = {component(d): d["spec"] for d in of_kind(render({}), "NetworkPolicy").values()}
    for role in ("learner", "actor", "rewarder", "exporter", "setup"):
        ports = {p["port"] for p in policies[role]["egress"][0]["ports"]}
        assert ports == ({4222, 8222} if role == "exporter" else {4222}), role
    # An external NATS is the operator's to protect.
    assert nats_policy(EXTERNAL_NATS) is None


def test_metrics_ports_take_ingress_from_the_monitoring_namespace_only():
    def ingress(values):
        docs = render(values)
        return {component(d): d["spec"]["ingress"] for d in of_kind(docs, "NetworkPolicy").values()}

    rule = {"ports": [{"port": "metrics", "protocol": "TCP"}]}
    weights = {"ports": [{"port": 8471, "protocol": "TCP"}]}  # actors' weight fetches
    for role, rules in ingress({}).items():
        if role in ("setup", "nats"):
            continue
        metrics = [r for r in rules if r["ports"] != weights["ports"]]
        assert metrics == [{"from": [MONITORING_NAMESPACE], **rule}], role
    assert ingress({})["setup"] == []
    prometheus = {"podSelector": {"matchLabels": {"app": "prometheus"}}}
    custom = ingress({"networkPolicy": {"metricsFrom": [prometheus]}})
    assert custom["rewarder"] == [{"from": [prometheus], **rule}]
    closed = ingress({"networkPolicy": {"metricsFrom": []}})  # not `from: []`, which means all
    assert all(closed[r] == [] for r in ("rewarder", "exporter"))
    assert all(
        [r["ports"] for r in closed[role]] == [weights["ports"]] for role in ("learner", "actor")
    )


class _KubeAPI(BaseHTTPRequestHandler):
    """The two reads of Helm's `lookup "v1" "Secret"`: discovery of v1, then the Secret."""

    objects: dict[str, dict] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/api/v1":
            secrets = {"name": "secrets", "namespaced": True, "kind": "Secret", "verbs": ["get"]}
            body = {"kind": "APIResourceList", "groupVersion": "v1", "resources": [secrets]}
            code = 200
        elif path in self.objects:
            body, code = self.objects[path], 200
        else:
            body = {"kind": "Status", "apiVersion": "v1", "reason": "NotFound", "code": 404}
            code = 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def kube_api():
    """A stand-in Kubernetes API server (namespace `rl`) and a kubeconfig for it."""
    _KubeAPI.objects = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    kubeconfig = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}],
            "current-context": "k",
        }
    )
    yield _KubeAPI.objects, kubeconfig
    server.shutdown()
    server.server_close()


def test_passwords_stay_the_same_across_upgrades(kube_api):
    """`helm upgrade` renders against the cluster: the chart reads the Secret it created back
    (`lookup`) and keeps every password, so NATS and the pods never disagree after an upgrade."""
    objects, kubeconfig = kube_api

    def rendered_secret() -> dict[str, str]:
        with helm.Config(kubeconfig_content=kubeconfig, namespace="rl") as config:
            with helm.Chart.load(CHART) as chart:
                files = config.render(chart, {}, name="aha", namespace="rl", is_upgrade=True)
        return yaml.safe_load(files["aha/templates/secret-nats-auth.yaml"])["stringData"]

    installed = rendered_secret()
    assert rendered_secret()["actor-password"] != installed["actor-password"]  # no Secret yet
    objects["/api/v1/namespaces/rl/secrets/aha-nats-auth"] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "aha-nats-auth", "namespace": "rl"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in installed.items()},
    }
    assert rendered_secret() == installed  # every password, and auth.conf built from them


def test_learner_nodes_train_together_and_actors_spread_over_their_gpus(tmp_path):
    """`learner.nodes: 2, gpus: 8`: two pods of eight ranks meeting at pod 0's stable name,
    one shared checkpoint volume, learner pods reaching each other on the rendezvous and
    collective ports only; `actor.gpus: 4`: vLLM over four GPUs, and four requested."""
    from actors.config import ActorConfig
    from learner.config import LearnerConfig
    from protocol.config import load_config

    docs = render(VALUES["multi-node"])
    (learner,) = of_kind(docs, "StatefulSet").values()
    assert learner["spec"]["replicas"] == 2
    spec = learner["spec"]["template"]["spec"]
    env = env_of(spec)
    assert env["AHA_LEARNER__RANKS"]["value"] == "8" and env["AHA_LEARNER__NODES"]["value"] == "2"
    assert env["AHA_LEARNER__RENDEZVOUS"]["value"] == "aha-learner-0.aha-learner.rl.svc:29400"
    index = "metadata.labels['apps.kubernetes.io/pod-index']"  # the pod's StatefulSet ordinal
    assert env["AHA_LEARNER__NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    stop = int(env["AHA_LEARNER__STOP_TIMEOUT_S"]["value"])
    assert stop < spec["terminationGracePeriodSeconds"]  # the launcher stops its ranks first
    (container,) = spec["containers"]
    assert {"name": "rendezvous", "containerPort": 29400} in container["ports"]
    service = of_kind(docs, "Service")[learner["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["rendezvous"] == 29400
    # the config the pods load, with their environment: it validates, node rank from the index
    config = of_kind(docs, "ConfigMap")["aha-config"]["data"]["aha.toml"]
    (tmp_path / "aha.toml").write_text(config)
    pod_env = {k: e["value"] for k, e in env.items() if "value" in e}
    loaded = load_config(
        LearnerConfig,
        tmp_path / "aha.toml",
        section="learner",
        environ={**pod_env, "AHA_LEARNER__NODE_RANK": "1"},
    )
    assert (loaded.ranks, loaded.nodes, loaded.node_rank) == (8, 2, 1)
    assert loaded.rendezvous == "aha-learner-0.aha-learner.rl.svc:29400"
    # one checkpoint folder for all nodes (DeepSpeed writes and reads every rank's shards there)
    assert "volumeClaimTemplates" not in learner["spec"]
    (claim,) = of_kind(docs, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # learner pods reach each other on the rendezvous and collective ports, and nothing else new
    policies = {component(d): d["spec"] for d in of_kind(docs, "NetworkPolicy").values()}
    peers = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "aha",
                "app.kubernetes.io/instance": "aha",
                "app.kubernetes.io/component": "learner",
            }
        }
    }
    ports = [
        {"port": 29400, "protocol": "TCP"},
        {"port": 32768, "endPort": 60999, "protocol": "TCP"},
    ]
    learner_policy = policies["learner"]
    assert {"to": [peers], "ports": ports} in learner_policy["egress"]
    assert {"from": [peers], "ports": ports} in learner_policy["ingress"]
    one_node = {component(d): d["spec"] for d in of_kind(render({}), "NetworkPolicy").values()}
    added = [r for r in learner_policy["egress"] if r not in one_node["learner"]["egress"]]
    assert added == [{"to": [peers], "ports": ports}]
    added = [r for r in learner_policy["ingress"] if r not in one_node["learner"]["ingress"]]
    assert added == [{"from": [peers], "ports": ports}]
    for role, policy in policies.items():  # no other pod may reach the learners' new ports
        if role != "learner":
            assert one_node[role] == policy, role
    # the actor: tensor parallelism over the GPUs it requests
    (actor,) = [d for d in of_kind(docs, "Deployment").values() if component(d) == "actor"]
    (container,) = actor["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    actor_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    actor_config = load_config(
        ActorConfig, tmp_path / "aha.toml", section="actor", environ=actor_env
    )
    assert actor_config.gpus == 4
    plain = pod_specs(render({}))
    assert "AHA_ACTOR__GPUS" not in env_of(plain["actor"])
    assert env_of(plain["learner"])["AHA_LEARNER__RANKS"]["value"] == "1"
    assert "AHA_LEARNER__RENDEZVOUS" not in env_of(plain["learner"])
