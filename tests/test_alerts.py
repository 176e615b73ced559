"""Alert book transitions and every rule on crafted samples, on both sides of each threshold."""

from __future__ import annotations

import json

import pytest

from watchdog import alerts
from watchdog.alerts import (
    AlertBook,
    Condition,
    DiskView,
    GpuView,
    ProviderView,
    StageView,
    WorkerView,
)
from watchdog.config import RulesConfig


def cond(active: bool, key: str = "replica-0/generate", alert: str = "queue_full", n: int = 10) -> Condition:
    return Condition(alert, key, active, "warning", f"depth {n}", {"queue_depth": n})


def states(events) -> list[tuple[str, str, str]]:
    return [(e.alert, e.key, e.state) for e in events]


# ---- the book -------------------------------------------------------------------------------


def test_pending_then_firing_after_for_duration():
    book = AlertBook({"queue_full": 60}, repeat_s=300)
    assert book.update([cond(True)], now=1000) == []
    assert book.update([cond(True)], now=1059.9) == []
    assert book.firing() == []
    events = book.update([cond(True)], now=1060)
    assert states(events) == [("queue_full", "replica-0/generate", "firing")]
    ev = events[0]
    assert (ev.since, ev.at, ev.repeat) == (1000, 1060, False)
    assert [e.key for e in book.firing()] == ["replica-0/generate"]
    # No event per tick while it keeps firing.
    assert book.update([cond(True)], now=1062) == []


def test_alert_without_for_fires_at_once():
    book = AlertBook({}, repeat_s=300)
    assert states(book.update([cond(True, alert="worker_dead", key="w1")], now=5)) == [("worker_dead", "w1", "firing")]


def test_flapping_before_for_resets_without_event():
    book = AlertBook({"queue_full": 60}, repeat_s=300)
    book.update([cond(True)], now=0)
    assert book.update([cond(False)], now=50) == []  # cleared while pending: silent
    assert book.update([cond(True)], now=55) == []  # the clock starts again here
    assert book.update([cond(True)], now=100) == []  # 45 s, not 100
    assert states(book.update([cond(True)], now=115)) == [("queue_full", "replica-0/generate", "firing")]


def test_resolved_once_with_latest_evidence():
    book = AlertBook({}, repeat_s=300)
    book.update([cond(True, n=10)], now=0)
    events = book.update([cond(False, n=3)], now=7)
    assert states(events) == [("queue_full", "replica-0/generate", "resolved")]
    assert events[0].evidence == {"queue_depth": 3}
    assert events[0].fields()["held_s"] == 7
    assert book.update([cond(False)], now=8) == []
    assert book.firing() == []


def test_absent_instance_resolves_unless_its_probe_was_skipped():
    book = AlertBook({}, repeat_s=300)
    book.update([cond(True, key="a", alert="worker_hung"), cond(True, key="gpu0", alert="gpu_idle_busy_queue")], now=0)
    # GPU probe failed this tick: its alert keeps firing; the vanished worker's resolves.
    events = book.update([], now=2, skipped=["gpu_idle_busy_queue"])
    assert states(events) == [("worker_hung", "a", "resolved")]
    assert [e.alert for e in book.firing()] == ["gpu_idle_busy_queue"]


def test_repeat_interval_reannounces_firing():
    book = AlertBook({}, repeat_s=300)
    book.update([cond(True)], now=0)
    assert book.update([cond(True)], now=299) == []
    events = book.update([cond(True, n=11)], now=300)
    assert states(events) == [("queue_full", "replica-0/generate", "firing")]
    assert events[0].repeat and events[0].since == 0 and events[0].evidence == {"queue_depth": 11}
    assert book.update([cond(True)], now=599) == []
    assert len(book.update([cond(True)], now=600)) == 1


def test_instances_are_independent():
    book = AlertBook({"queue_full": 10}, repeat_s=300)
    book.update([cond(True, key="a")], now=0)
    book.update([cond(True, key="a"), cond(True, key="b")], now=5)
    assert [e.key for e in book.update([cond(True, key="a"), cond(True, key="b")], now=10)] == ["a"]
    assert [e.key for e in book.update([cond(True, key="a"), cond(True, key="b")], now=15)] == ["b"]


def test_event_fields_are_the_log_record():
    book = AlertBook({}, repeat_s=300)
    ev = book.update([Condition("stage_stalled", "0/paste", True, "critical", "stuck", {"since_progress_s": 31.0})], now=1)[0]
    fields = ev.with_action("restarted worker r0").fields()
    assert fields["event"] == "alert"
    assert {k: fields[k] for k in ("alert", "key", "state", "severity", "summary", "action")} == {
        "alert": "stage_stalled", "key": "0/paste", "state": "firing", "severity": "critical",
        "summary": "stuck", "action": "restarted worker r0",
    }
    assert fields["evidence"] == {"since_progress_s": 31.0}
    assert "worker" in fields["fix"]
    json.dumps(fields)  # a log line
    assert ev.level == "error"
    assert book.update([], now=2)[0].level == "info"


def test_for_durations_follow_rules_config():
    rules = RulesConfig(queue_full_for_s=42.0, gpu_idle_for_s=7.0, zombies_for_s=3.0)
    assert alerts.for_durations(rules) == {"queue_full": 42.0, "gpu_idle_busy_queue": 7.0, "zombies": 3.0}
    assert set(alerts.FIXES) == set(alerts.ALERTS)


# ---- rules ----------------------------------------------------------------------------------


def stage(**kw) -> StageView:
    base = dict(replica=0, stage="generate", items_in=8, items_out=8, last_progress=1000.0,
                heartbeat=1000.0, queue_depth=0, queue_capacity=10, gpu=0, state="busy")
    return StageView(**{**base, **kw})


def active(conditions) -> dict[str, bool]:
    return {c.key: c.active for c in conditions}


@pytest.mark.parametrize(
    "util, mem, depth, jobs_waiting, expected",
    [
        (0.0, 40000, 4, 0, True),  # the incident: memory held, work queued, 0 %
        (5.0, 40000, 4, 0, True),  # at the idle threshold
        (5.1, 40000, 4, 0, False),  # computing
        (0.0, 1023, 4, 0, False),  # models not loaded (worker_dead/hung cover that)
        (0.0, 1024, 4, 0, True),
        (0.0, 40000, 0, 0, False),  # nothing to do: idle is fine
        (0.0, 40000, 0, 2, True),  # jobs waiting in the store count as work
    ],
)
def test_gpu_idle_busy_queue(util, mem, depth, jobs_waiting, expected):
    gpus = [GpuView(0, util, mem), GpuView(1, 0.0, 40000)]
    stages = [stage(queue_depth=depth, gpu=0), stage(stage="paste", queue_depth=0, gpu=0), stage(replica=1, gpu=1)]
    got = alerts.gpu_idle_busy_queue(gpus, stages, gpu_idle_util_pct=5.0, gpu_busy_mem_mib=1024.0, jobs_waiting=jobs_waiting)
    assert active(got) == {"gpu-0": expected, "gpu-1": jobs_waiting > 0}
    assert got[0].evidence["queued_items"] == depth


@pytest.mark.parametrize(
    "kw, now, expected",
    [
        (dict(items_in=12, items_out=8), 1029.9, False),  # not yet stall_after
        (dict(items_in=12, items_out=8), 1030.0, True),
        (dict(queue_depth=3), 1030.0, True),  # input queued, nothing in hand
        (dict(), 5000.0, False),  # no input: waiting for work is not a stall
        (dict(items_in=12, items_out=8, state="backpressure"), 5000.0, False),  # blocked downstream
    ],
)
def test_stage_stalled(kw, now, expected):
    got = alerts.stage_stalled([stage(**kw)], stall_after_s=30.0, now=now)
    assert active(got) == {"replica-0/generate": expected}
    assert got[0].evidence["since_progress_s"] == pytest.approx(now - 1000.0)


@pytest.mark.parametrize("depth, capacity, expected", [(9, 10, False), (10, 10, True), (0, 0, False)])
def test_queue_full(depth, capacity, expected):
    assert active(alerts.queue_full([stage(queue_depth=depth, queue_capacity=capacity)])) == {"replica-0/generate": expected}


def test_queue_full_fires_only_when_continuously_full():
    book = AlertBook(alerts.for_durations(RulesConfig(queue_full_for_s=60.0)), repeat_s=300)
    full, not_full = stage(queue_depth=10), stage(queue_depth=2)
    for t, s in [(0, full), (30, full), (45, not_full), (50, full), (100, full)]:
        assert book.update(alerts.queue_full([s]), now=t) == [], t
    assert states(book.update(alerts.queue_full([full]), now=110)) == [("queue_full", "replica-0/generate", "firing")]


def test_worker_dead_and_hung():
    workers = [
        WorkerView("ok", 10, True, 19.9),
        WorkerView("hung", 11, True, 20.1),
        WorkerView("dead", 12, False, 500.0, exit_code=-9),
    ]
    assert active(alerts.worker_dead(workers)) == {"ok": False, "hung": False, "dead": True}
    assert active(alerts.worker_hung(workers, heartbeat_timeout_s=20.0)) == {"ok": False, "hung": True, "dead": False}
    dead = alerts.worker_dead(workers)[2]
    assert dead.evidence == {"pid": 12, "exit_code": -9} and "-9" in dead.summary


@pytest.mark.parametrize("by_parent, expected", [({}, False), ({100: 2}, False), ({100: 2, 200: 1}, True)])
def test_zombies(by_parent, expected):
    (c,) = alerts.zombies(by_parent, zombies_max=2)
    assert c.active is expected
    assert c.evidence["count"] == sum(by_parent.values())
    assert c.evidence["parents"] == {str(p): n for p, n in by_parent.items()}


def test_disk_low():
    got = alerts.disk_low([DiskView("/a", 1023.9), DiskView("/b", 1024.0)], disk_min_free_mib=1024.0)
    assert active(got) == {"/a": True, "/b": False}


def test_cpu_fallback():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    got = alerts.cpu_fallback([
        ProviderView(0, (cuda, cpu), (cuda, cpu)),
        ProviderView(1, (cuda, cpu), (cpu,), reason="libcublasLt.so.13: cannot open shared object file"),
        ProviderView(2, (cpu,), (cpu,)),
    ])
    assert active(got) == {"replica-0": False, "replica-1": True, "replica-2": False}
    assert got[1].evidence["missing"] == [cuda]
    assert "libcublasLt" in got[1].summary


def test_a_starting_worker_is_hung_only_after_the_start_timeout():
    """Six replicas restarted together on two busy cores took longer than one heartbeat to load
    their models; judged by the heartbeat they were restarted again, for minutes."""
    loading = WorkerView("replica-1/generate", 11, True, heartbeat_age_s=30.0)
    running = WorkerView("replica-0/generate", 10, True, heartbeat_age_s=30.0)
    got = alerts.worker_hung([running, loading], heartbeat_timeout_s=20.0, starting={"replica-1"}, start_timeout_s=120.0)
    assert active(got) == {"replica-0/generate": True, "replica-1/generate": False}
    late = alerts.worker_hung([WorkerView("replica-1/generate", 11, True, heartbeat_age_s=121.0)],
                              heartbeat_timeout_s=20.0, starting={"replica-1"}, start_timeout_s=120.0)
    assert late[0].active and "still starting after 121 s" in late[0].summary and late[0].evidence["timeout_s"] == 120.0
