"""The group outcomes are one list: whatever is counted is checkpointed, logged, exported and
plotted, with nothing spelled out again."""

import dataclasses

from prometheus_client import REGISTRY

from deploy.monitoring.dashboard import build
from learner.loop import Progress, count
from learner.metrics import STEP_KEYS, export_gauges
from learner.outcomes import IN_FLIGHT, ISSUED, Outcome


def counted() -> Progress:
    """A Progress that counted outcome i (in declaration order) i + 1 times."""
    progress = Progress()
    count(progress, [(None, o) for i, o in enumerate(Outcome) for _ in range(i + 1)])
    return progress


def test_every_counted_outcome_reaches_the_lines_and_the_gauges():
    progress = counted()
    record = {**progress.counts(), IN_FLIGHT: 7}
    assert record == {o.key: i + 1 for i, o in enumerate(Outcome)} | {IN_FLIGHT: 7}
    assert set(record) <= set(STEP_KEYS)  # the step log line and `aha up` see each of them
    export_gauges(record)
    for i, o in enumerate(Outcome):
        assert REGISTRY.get_sample_value("aha_learner_groups", {"outcome": o.value}) == i + 1
    assert REGISTRY.get_sample_value(f"aha_learner_{IN_FLIGHT}") == 7


def test_counts_live_only_in_the_outcome_list():
    """A new `groups_*` counter added to Progress beside `Outcome` would be counted but
    neither exported nor plotted: add it to `learner.outcomes.Outcome` instead."""
    stray = [f.name for f in dataclasses.fields(Progress) if f.name.startswith("groups_")]
    assert stray == []


def test_the_checkpoint_keeps_every_count():
    progress = counted()
    assert Progress.from_state(progress.state()) == progress
    # a checkpoint written before an outcome existed loads with that outcome at 0
    old = {k: v for k, v in progress.state().items() if k != Outcome.DUPLICATES.key}
    assert Progress.from_state(old).groups[Outcome.DUPLICATES] == 0


def test_the_dashboard_plots_every_outcome():
    exprs = [t["expr"] for p in build()["panels"] for t in p.get("targets", [])]
    for o in Outcome:
        assert any(f'aha_learner_groups{{outcome="{o}"}}' in e for e in exprs), o
    assert any(f"aha_learner_{IN_FLIGHT}" in e for e in exprs)


def test_issued_outcomes_exclude_what_was_never_issued():
    # tasks_issued = Σ ISSUED + in flight: foreign groups and duplicate deliveries are not tasks
    assert set(Outcome) - set(ISSUED) == {Outcome.FOREIGN, Outcome.DUPLICATES}
