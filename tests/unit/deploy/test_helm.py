"""The Helm chart (deploy/helm/aha): lint, render, validate against the Kubernetes schemas,
and check what the deployment promises — KEDA and NATS permissions name exactly the streams,
consumers and subjects of protocol/names.py, only learner and actors get GPUs, each part
scales on its own, rewarders reach nothing but NATS.

helm-python-sdk embeds Helm's library (no helm binary); kubernetes-validate ships the
schemas. The NATS chart dependency is not vendored: `helm lint` warns that charts/ lacks it,
and rendering does not need it.
"""

from __future__ import annotations

import json
import re
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
    TASKS,
    Stage,
    inbox_prefix,
)

from tests.unit.deploy.test_compose import load_every_section

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
            "publish": [*_consumes(ROLLOUTS), SCORED.subject, ROLLOUTS.dead_subject],
            "subscribe": [replies("rewarder"), ROLLOUTS.max_deliveries_advisory],
        },
        "exporter": {
            "publish": [f"$JS.API.STREAM.INFO.{s.stream}" for s in STAGES.values()]
            + [f"$JS.API.STREAM.INFO.{STREAM_DEAD}"]
            + [f"$JS.API.CONSUMER.INFO.{s.stream}.{s.durable}" for s in STAGES.values()],
            "subscribe": [replies("exporter")],
        },
    }


def users_of(conf: dict) -> dict[str, dict[str, list[str]]]:
    return {
        u["user"]: {k: u["permissions"][k]["allow"] for k in ("publish", "subscribe")}
        for u in conf["authorization"]["users"]
    }


def compose_nats_conf() -> dict:
    """deploy/nats/nats.conf as data: JSON once comments go and $VARIABLES are quoted."""
    lines = [
        l
        for l in (DEPLOY / "nats" / "nats.conf").read_text().splitlines()
        if not l.lstrip().startswith("#")
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
        assert list(users) == ["learner", "actor", "rewarder", "exporter"]
        for role, perms in expected.items():
            for kind in ("publish", "subscribe"):
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
    for role in ("actor", "rewarder", "exporter"):
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
        assert set(policies) == {"learner", "actor", "rewarder", "exporter", "setup"}
        rewarder = policies["rewarder"]
        assert rewarder["policyTypes"] == ["Ingress", "Egress"]
        nats_rule, dns_rule = rewarder["egress"]
        assert nats_rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
        assert {p["port"] for p in dns_rule["ports"]} == {53}
        assert rewarder["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
        assert len(policies["learner"]["egress"]) == 3  # + the extra rule asked for
    nats_peer = render({})
    (peer,) = next(
        p for p in of_kind(nats_peer, "NetworkPolicy").values() if component(p) == "rewarder"
    )["spec"]["egress"][0]["to"]
    assert peer == {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "aha"}
        }
    }


def test_rewarder_gets_what_the_sandbox_needs_and_nothing_more():
    specs = pod_specs(render({}))
    rewarder = specs["rewarder"]
    sc = rewarder["containers"][0]["securityContext"]
    assert sc["capabilities"] == {"add": ["SYS_ADMIN"]}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
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
