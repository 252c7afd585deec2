"""The Grafana dashboard, written as data: `python -m deploy.monitoring.dashboard` regenerates
`deploy/monitoring/grafana/aha.json` (compose) and the Helm chart's copy.

Every series on it is one aha exports: `aha_queue_*` (protocol/depth.py),
`aha_stage_messages_total` (protocol/stage.py), `aha_rewarder_*` (rewarder/service.py),
`aha_learner_*` (learner/metrics.py) and `aha_actor_*` (actors/service.py);
tests/unit/deploy/test_compose.py checks it. The exceptions are listed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from learner.outcomes import IN_FLIGHT, Outcome

DEPLOY = Path(__file__).resolve().parents[1]
OUTPUTS = (
    DEPLOY / "monitoring" / "grafana" / "aha.json",
    DEPLOY / "helm" / "aha" / "dashboards" / "aha.json",
)

REGISTERED_AT_RUN_TIME = {
    "aha_actor_idle_seconds_total": "actors/service.py: a collector each actor process registers",
}
NOT_YET_EXPORTED: dict[str, str] = {}


def _target(expr: str, legend: str, ref: str) -> dict:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }


def panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    description: str = "",
) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            _target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
        ],
    }


def heatmap(title: str, expr: str, description: str = "") -> dict:
    p = panel(title, [(expr, "{{le}}")], kind="heatmap", description=description)
    p["targets"][0]["format"] = "heatmap"
    p["options"] = {"calculate": False, "yAxis": {"unit": "short"}}
    return p


def _mean(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}_sum[5m])) / sum{group} (rate({metric}_count[5m]))"


def _quantile(q: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket[5m])))"


ROWS: list[tuple[str, list[dict]]] = [
    (
        "Queues (aha top)",
        [
            panel(
                "Pending per stage",
                [("aha_queue_pending", "{{stage}}")],
                description="Messages not yet delivered: the work waiting in front of each "
                "stage. tasks growing = add actors; rollouts growing = add rewarders; scored "
                "growing = the learner is the bottleneck.",
            ),
            panel(
                "Ack pending per stage",
                [("aha_queue_ack_pending", "{{stage}}")],
                description="Delivered, not yet acknowledged: work in progress (the learner "
                "holds scored groups until its next checkpoint).",
            ),
            panel(
                "Redelivered and waiting",
                [
                    ("aha_queue_redelivered", "redelivered {{stage}}"),
                    ("aha_queue_waiting", "waiting {{stage}}"),
                ],
                description="waiting > 0 with pending = 0: that stage is starved.",
            ),
            panel(
                "Dead letters",
                [('aha_queue_messages{stage="dead"}', "dead letters")],
                description="Messages an operator must look at (aha.dead.<stage>).",
            ),
            panel(
                "Stage throughput",
                [
                    (
                        "sum by (stage, outcome) (rate(aha_stage_messages_total[1m]))",
                        "{{stage}} {{outcome}}",
                    )
                ],
                unit="ops",
            ),
        ],
    ),
    (
        "Learner",
        [
            panel(
                "Reward and accuracy",
                [
                    ('aha_learner_reward_mean{component="total"}', "reward"),
                    ("aha_learner_accuracy", "accuracy"),
                ],
            ),
            heatmap(
                "Staleness (policy versions)",
                "sum by (le) (increase(aha_learner_staleness_bucket[$__rate_interval]))",
                "How many versions behind the learner each trained group was sampled.",
            ),
            panel(
                "Groups per second",
                [(f'deriv(aha_learner_groups{{outcome="{o}"}}[5m])', o.label) for o in Outcome],
                unit="ops",
                description="What became of the scored groups, one series per outcome ("
                + ", ".join(o.label for o in Outcome)
                + "; cumulative gauges, so their slope).",
            ),
            panel("Response length (tokens)", [("aha_learner_response_length", "mean")]),
            panel(
                "Loss, KL, clip fraction, ratios",
                [
                    ("aha_learner_loss", "loss"),
                    ("aha_learner_kl", "KL"),
                    ("aha_learner_clip_fraction", "clip fraction"),
                    ("aha_learner_ratio", "ratio"),
                    ("aha_learner_is_weight", "IS weight"),
                ],
            ),
            panel("Step time", [("aha_learner_step_seconds", "step")], unit="s"),
            panel(
                "Idle share (waiting for data)",
                [("aha_learner_wait_share", "learner idle")],
                unit="percentunit",
            ),
            panel(
                "Learner tokens/s and groups in flight",
                [
                    ("aha_learner_tokens_per_second", "tokens/s"),
                    (f"aha_learner_{IN_FLIGHT}", "in flight"),
                ],
            ),
        ],
    ),
    (
        "Weights",
        [
            panel(
                "Weight publish and load time",
                [
                    ("aha_learner_weight_publish_seconds", "publish (learner)"),
                    ("aha_learner_weight_store_upload_seconds", "store upload (learner)"),
                    ("aha_actor_weight_load_seconds", "load {{actor}}"),
                ],
                unit="s",
            ),
            panel(
                "Policy version",
                [
                    ("aha_learner_policy_version", "learner"),
                    ("aha_actor_policy_version", "{{actor}}"),
                ],
            ),
            panel(
                "Weights rejected",
                [("sum by (actor) (rate(aha_actor_weights_rejected_total[5m]))", "{{actor}}")],
                unit="ops",
                description="Versions an actor refused (corrupt or missing shards): it keeps "
                "serving the version it had.",
            ),
        ],
    ),
    (
        "Actors",
        [
            panel(
                "Tokens/s per actor",
                [("sum by (actor) (rate(aha_actor_tokens_total[1m]))", "{{actor}}")],
            ),
            panel(
                "Prompts/s",
                [("sum(rate(aha_actor_prompts_total[1m]))", "all actors")],
                unit="ops",
            ),
            panel(
                "Actor idle share",
                [("rate(aha_actor_idle_seconds_total[5m])", "{{actor}}")],
                unit="percentunit",
            ),
        ],
    ),
    (
        "Rewarders",
        [
            panel(
                "Completions scored/s",
                [("sum(rate(aha_rewarder_completions_total[1m]))", "completions/s")],
                unit="ops",
            ),
            panel(
                "Reward components (mean)",
                [(_mean("aha_rewarder_reward_component", "component"), "{{component}}")],
            ),
            panel(
                "Verifier errors",
                [("sum by (kind) (rate(aha_rewarder_verifier_failures_total[5m]))", "{{kind}}")],
                unit="ops",
                description="Completions left without reward (error, timeout, crash): never "
                "silently 0.",
            ),
            panel(
                "Scoring time and queue wait",
                [
                    (_quantile(0.95, "aha_rewarder_group_seconds"), "group p95"),
                    (_quantile(0.95, "aha_rewarder_queue_wait_seconds"), "queue wait p95"),
                ],
                unit="s",
            ),
        ],
    ),
]


def build() -> dict:
    panels: list[dict] = []
    y = 0
    next_id = 1
    for title, row in ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": next_id,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        for i, p in enumerate(row):
            p = {
                **p,
                "id": next_id,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
            }
            panels.append(p)
            next_id += 1
        y += 8 * ((len(row) + 2) // 3)
    return {
        "uid": "aha-overview",
        "title": "aha",
        "description": "Queue depth per stage, learner, weights, actors, rewarders (deploy/README.md)",
        "tags": ["aha"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)


if __name__ == "__main__":
    main()
