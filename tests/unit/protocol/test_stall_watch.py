"""`StallWatch`: which stage counts as stalled, and what is logged, on a clock we control."""

from __future__ import annotations

from structlog.testing import capture_logs

from protocol.depth import Depth, Stall, StallWatch


def reading(**rollouts) -> dict[str, Depth]:
    return {"tasks": Depth(), "rollouts": Depth(**rollouts), "dead": Depth(messages=4)}


def test_work_waiting_without_progress_is_a_stall_reported_once_per_period():
    now = [0.0]
    watch = StallWatch(after_s=10, clock=lambda: now[0])
    held = reading(pending=2, ack_pending=1, consumed=5, delivered_seq=8)
    with capture_logs() as logs:
        assert watch.update(held) == {}
        now[0] = 9.9
        assert watch.update(held) == {}
        now[0] = 10
        assert watch.update(held) == {"rollouts": Stall("rollouts", 2, 1, 10.0)}
        now[0] = 15
        assert watch.update(held)["rollouts"].seconds == 15  # still stalled, not logged again
        now[0] = 20
        watch.update(held)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [
        (w["stage"], w["pending"], w["ack_pending"], w["seconds_without_progress"])
        for w in warnings
    ] == [("rollouts", 2, 1, 10.0), ("rollouts", 2, 1, 20.0)]


def test_an_ack_or_a_new_delivery_is_progress_a_redelivery_is_not():
    now = [0.0]
    watch = StallWatch(after_s=10, clock=lambda: now[0])
    watch.update(reading(pending=3, consumed=5, delivered_seq=8))
    now[0] = 10
    with capture_logs() as logs:
        # the same message delivered again (redelivered goes up): no progress
        again = reading(pending=3, redelivered=1, consumed=5, delivered_seq=8)
        assert "rollouts" in watch.update(again)
        now[0] = 11
        assert watch.update(reading(pending=3, consumed=6, delivered_seq=8)) == {}  # one acked
    assert [e["event"] for e in logs][-1] == "stage progressing again"
    now[0] = 22
    assert watch.update(reading(pending=3, consumed=6, delivered_seq=9)) == {}  # one taken


def test_a_stage_with_nothing_waiting_is_idle_not_stalled():
    now = [0.0]
    watch = StallWatch(after_s=1, clock=lambda: now[0])
    for t in range(5):
        now[0] = t * 10
        assert watch.update(reading(consumed=5, delivered_seq=8, waiting=1)) == {}
