"""/metrics: names, labels and values survive a round trip through Prometheus' own parser."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from watchdog.alerts import AlertBook, Condition, GpuView, StageView
from watchdog.metrics import Metrics


def parse(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the rendered text."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stage(replica: int, name: str, depth: int, out: int) -> StageView:
    return StageView(replica, name, out + 1, out, 0.0, 0.0, depth, 10, gpu=replica,
                     times=(("work", 9.5), ("input", 0.25), ("claim", 0.0)))


def test_views_round_trip():
    m = Metrics(version="0.1.0", mode="embedded")
    book = AlertBook({}, repeat_s=300)
    book.update([
        Condition("stage_stalled", "0/paste", True, "critical", "", {}),
        Condition("stage_stalled", "1/paste", True, "critical", "", {}),
        Condition("zombies", "", True, "warning", "", {}),
    ], now=0)
    m.update_from(
        gpus=[GpuView(0, 37.0, 2048.0), GpuView(1, 0.0, 0.5)],
        stages=[stage(0, "generate", 3, 120), stage(1, "paste", 10, 7)],
        jobs={"queued": 4, "running": 2, "succeeded": 9},
        zombies=41,
        restarts={"replica-0": 3},
        firing=book.firing(),
    )
    m.observe_tick(0.02)
    got = parse(m)
    assert got[("heygem_gpu_utilization_ratio", (("gpu", "0"),))] == 0.37
    assert got[("heygem_gpu_utilization_ratio", (("gpu", "1"),))] == 0.0
    assert got[("heygem_gpu_memory_used_bytes", (("gpu", "0"),))] == 2048 * 1024 * 1024
    assert got[("heygem_queue_depth", (("replica", "1"), ("stage", "paste")))] == 10
    assert got[("heygem_queue_capacity", (("replica", "0"), ("stage", "generate")))] == 10
    assert got[("heygem_stage_items_processed_total", (("replica", "0"), ("stage", "generate")))] == 120
    assert got[("heygem_stage_seconds_total", (("kind", "work"), ("replica", "0"), ("stage", "generate")))] == 9.5
    assert got[("heygem_stage_seconds_total", (("kind", "input"), ("replica", "1"), ("stage", "paste")))] == 0.25
    assert got[("heygem_jobs", (("state", "queued"),))] == 4
    assert got[("heygem_zombie_processes", ())] == 41
    assert got[("heygem_worker_restarts_total", (("worker", "replica-0"),))] == 3
    assert got[("heygem_alerts_firing", (("alert", "stage_stalled"),))] == 2
    assert got[("heygem_alerts_firing", (("alert", "zombies"),))] == 1
    assert got[("heygem_alerts_firing", (("alert", "cpu_fallback"),))] == 0  # every known alert, even at 0
    assert got[("heygem_tick_duration_seconds_count", ())] == 1
    assert got[("heygem_tick_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("heygem_tick_duration_seconds_bucket", (("le", "0.01"),))] == 0
    assert got[("heygem_daemon_info", (("mode", "embedded"), ("version", "0.1.0")))] == 1


def test_counter_types_and_names():
    m = Metrics("0.1.0", "embedded")
    m.update_from(stages=[stage(0, "decode", 0, 5)], restarts={"w": 1})
    families = {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}
    assert families["heygem_stage_items_processed"] == "counter"
    assert families["heygem_stage_seconds"] == "counter"
    assert families["heygem_worker_restarts"] == "counter"
    assert families["heygem_queue_depth"] == "gauge"
    assert families["heygem_tick_duration_seconds"] == "histogram"
    assert all(name.startswith("heygem_") for name in families)


def test_later_update_replaces_views_and_keeps_the_rest():
    m = Metrics("0.1.0", "external")
    m.update_from(gpus=[GpuView(0, 50.0, 1.0), GpuView(1, 50.0, 1.0)], zombies=3)
    m.update_from(gpus=[GpuView(1, 80.0, 1.0)])  # GPU 0 vanished; zombies not re-sampled
    got = parse(m)
    assert ("heygem_gpu_utilization_ratio", (("gpu", "0"),)) not in got  # no stale series
    assert got[("heygem_gpu_utilization_ratio", (("gpu", "1"),))] == 0.8
    assert got[("heygem_zombie_processes", ())] == 3


def test_dedicated_registry():
    Metrics("0.1.0", "embedded")
    Metrics("0.1.0", "embedded")  # a second one does not collide
    assert "heygem_gpu_utilization_ratio" not in {f.name for f in REGISTRY.collect()}


def test_unit_states_are_one_hot():
    from prometheus_client.parser import text_string_to_metric_families

    from watchdog.metrics import Metrics

    m = Metrics("test", "embedded")
    m.update_from(units={"replica-0": "running", "replica-1": "crash_loop"})
    family = next(f for f in text_string_to_metric_families(m.render().decode()) if f.name == "heygem_unit_state")
    on = {(s.labels["unit"], s.labels["state"]) for s in family.samples if s.value == 1.0}
    assert on == {("replica-0", "running"), ("replica-1", "crash_loop")}
    assert len(family.samples) == 2 * 6
