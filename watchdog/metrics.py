"""The daemon's /metrics: what it sampled last tick, in Prometheus text format.

The values come from the same plain views the rules read, so a dashboard and an alert can never
disagree about what was seen. Views are rendered at scrape time by a collector from the latest
`update_from` call, which has two consequences worth having: a stage or GPU that disappears stops
being exported (no stale series), and cumulative counters such as a stage's `items_out` are
exported as they are, resets included, which Prometheus' rate() understands.

A dedicated CollectorRegistry keeps the export to our own metrics (and lets tests build many).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from watchdog.alerts import ALERTS, AlertEvent, GpuView, StageView
from watchdog.supervisor import STATES

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_MIB = 1024 * 1024
_TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All metrics of one daemon; `render()` is what /metrics serves.

    `update_from` replaces whole views (tuples, swapped in one assignment each), so a scrape from
    the HTTP thread sees either the previous tick's view or this one's, never half of each.
    """

    def __init__(self, version: str, mode: str, host: Optional[str] = None, store: Optional[str] = None):
        """`host`: every sample gets a `host` label with it (a Prometheus server scrapes every host
        of a fleet); `store`: the job store's backend, in heygem_daemon_info."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.host = host
        self._store: Optional[tuple[bool, float, int]] = None  # (reachable, oldest queued wait, jobs held here)
        self._job_events: dict[str, int] = dict.fromkeys(JOB_EVENTS, 0)
        self._gpus: tuple[GpuView, ...] = ()
        self._stages: tuple[StageView, ...] = ()
        self._jobs: tuple[tuple[str, int], ...] = ()
        self._zombies: Optional[int] = None
        self._restarts: tuple[tuple[str, int], ...] = ()
        self._units: tuple[tuple[str, str], ...] = ()
        self._firing: tuple[tuple[str, int], ...] = tuple((name, 0) for name in ALERTS)
        self._http = None  # a watchdog.http.HttpStats, read at scrape time
        self.registry.register(self)
        self._tick = Histogram(
            "heygem_tick_duration_seconds", "Time one daemon tick took (probes, rules, actions).",
            buckets=_TICK_BUCKETS, registry=self.registry,
        )
        info = {"version": version, "mode": mode, **({"store": store} if store else {})}
        Info("heygem_daemon", "The running watchdog daemon.", registry=self.registry).info(info)

    def update_from(
        self,
        *,
        gpus: Optional[Sequence[GpuView]] = None,
        stages: Optional[Sequence[StageView]] = None,
        jobs: Optional[Mapping[str, int]] = None,
        zombies: Optional[int] = None,
        restarts: Optional[Mapping[str, int]] = None,
        units: Optional[Mapping[str, str]] = None,
        firing: Optional[Iterable[AlertEvent]] = None,
    ) -> None:
        """Take this tick's views; an argument left None keeps its previous value.

        `jobs`: count per job state; `restarts`: cumulative restarts per worker (e.g.
        `RestartPolicy.restarts`); `units`: each supervised unit's state (`watchdog.supervisor`);
        `firing`: `AlertBook.firing()`.
        """
        if gpus is not None:
            self._gpus = tuple(gpus)
        if stages is not None:
            self._stages = tuple(stages)
        if jobs is not None:
            self._jobs = tuple(sorted(jobs.items()))
        if zombies is not None:
            self._zombies = zombies
        if restarts is not None:
            self._restarts = tuple(sorted(restarts.items()))
        if units is not None:
            self._units = tuple(sorted(units.items()))
        if firing is not None:
            counts = Counter({name: 0 for name in ALERTS})
            counts.update(e.alert for e in firing)
            self._firing = tuple(sorted(counts.items()))

    def observe_tick(self, seconds: float) -> None:
        self._tick.observe(seconds)

    def watch_http(self, stats) -> None:
        """Export the HTTP server's connections, refusals and bounds (`watchdog.http.HttpStats`)."""
        self._http = stats

    def update_store(self, reachable: bool, oldest_queued_s: Optional[float], held: int) -> None:
        """This tick's look at the job store: could it be read, how long the oldest queued job has
        waited (None: nothing queued), how many running jobs this host's workers hold."""
        self._store = (reachable, oldest_queued_s or 0.0, held)

    def count_job(self, event: str) -> None:
        """One job event of this host's workers (claimed, succeeded, failed, released)."""
        if event in self._job_events:
            self._job_events = {**self._job_events, event: self._job_events[event] + 1}

    def render(self) -> bytes:
        """The text exposition format (serve with CONTENT_TYPE_LATEST); every sample carries the
        `host` label when the daemon was given one."""
        return generate_latest(self.registry if self.host is None else _Labelled(self.registry, {"host": self.host}))

    def collect(self):
        """The view-backed families (called by the registry at scrape time)."""
        gpus, stages = self._gpus, self._stages
        util = GaugeMetricFamily("heygem_gpu_utilization_ratio", "GPU compute utilisation, 0..1.", labels=["gpu"])
        mem = GaugeMetricFamily("heygem_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        for g in gpus:
            util.add_metric([str(g.index)], g.util_pct / 100.0)
            mem.add_metric([str(g.index)], g.mem_used_mib * _MIB)
        yield util
        yield mem

        depth = GaugeMetricFamily("heygem_queue_depth", "Items waiting in a stage's input queue.", labels=["replica", "stage"])
        capacity = GaugeMetricFamily("heygem_queue_capacity", "Capacity of a stage's input queue.", labels=["replica", "stage"])
        processed = CounterMetricFamily("heygem_stage_items_processed", "Items a stage has handed on.", labels=["replica", "stage"])
        dropped = CounterMetricFamily("heygem_stage_items_dropped", "Items a stage let go because their job failed or was cancelled.",
                                      labels=["replica", "stage"])
        spent = CounterMetricFamily("heygem_stage_seconds", "Wall seconds a stage spent, by kind: work (frames), or "
                                    "waiting for input, output, a ring slot, a job (claim), a job's start or end.",
                                    labels=["replica", "stage", "kind"])
        for s in stages:
            labels = [str(s.replica), s.stage]
            depth.add_metric(labels, s.queue_depth)
            capacity.add_metric(labels, s.queue_capacity)
            processed.add_metric(labels, s.items_out - s.dropped)
            dropped.add_metric(labels, s.dropped)
            for kind, seconds in s.times:
                spent.add_metric([*labels, kind], seconds)
        yield depth
        yield capacity
        yield processed
        yield dropped
        yield spent

        jobs = GaugeMetricFamily("heygem_jobs", "Jobs in the store by state.", labels=["state"])
        for state, n in self._jobs:
            jobs.add_metric([state], n)
        yield jobs

        if self._zombies is not None:
            yield GaugeMetricFamily("heygem_zombie_processes", "Zombie processes in the service's tree.", value=self._zombies)

        restarts = CounterMetricFamily("heygem_worker_restarts", "Worker restarts by the daemon.", labels=["worker"])
        for worker, n in self._restarts:
            restarts.add_metric([worker], n)
        yield restarts

        state = GaugeMetricFamily("heygem_unit_state", "1 for the state each supervised unit is in (starting, running, "
                                  "stopping, backoff, crash_loop, out_of_service).", labels=["unit", "state"])
        for unit, current in self._units:
            for name in STATES:
                state.add_metric([unit, name], 1.0 if name == current else 0.0)
        yield state

        firing = GaugeMetricFamily("heygem_alerts_firing", "Alert instances firing, by alert name.", labels=["alert"])
        for name, n in self._firing:
            firing.add_metric([name], n)
        yield firing

        if self._http is not None:
            yield from _http_families(self._http.view())

        events = CounterMetricFamily("heygem_job_events", "Job events of this host's workers: claimed, succeeded, "
                                     "failed, released (input missing here).", labels=["event"])
        for event, n in self._job_events.items():
            events.add_metric([event], n)
        yield events
        if self._store is not None:
            reachable, oldest, held = self._store
            yield GaugeMetricFamily("heygem_store_up", "1 when the daemon's last tick could read the job store.",
                                    value=1.0 if reachable else 0.0)
            yield GaugeMetricFamily("heygem_queue_oldest_age_seconds", "How long the oldest queued job has waited "
                                    "(the store's clock; 0 when none waits). The same on every host of a shared store.",
                                    value=oldest)
            yield GaugeMetricFamily("heygem_jobs_held", "Running jobs held by this host's workers.", value=held)


JOB_EVENTS = ("claimed", "succeeded", "failed", "released")


class _Labelled:
    """A registry seen with constant labels added to every sample (for `generate_latest`)."""

    def __init__(self, registry, labels: dict):
        self.registry, self.labels = registry, labels

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield out


def _http_families(view: dict):
    limits = view["limits"]
    yield GaugeMetricFamily("heygem_http_connections_active", "HTTP requests being handled now (one thread each).",
                            value=view["active"])
    yield GaugeMetricFamily("heygem_http_connections_max", "Most HTTP requests handled at once ([daemon] max_connections).",
                            value=limits["max_connections"])
    yield GaugeMetricFamily("heygem_http_request_timeout_seconds",
                            "Deadline for a whole HTTP request to arrive ([daemon] request_timeout_s).",
                            value=limits["request_timeout_s"])
    yield GaugeMetricFamily("heygem_jobs_max_queued", "Queued jobs at which /easy/submit answers 10001 busy "
                            "([daemon] max_queued).", value=limits["max_queued"])
    rejected = CounterMetricFamily("heygem_http_rejected", "HTTP requests refused, by reason: busy (max_connections), "
                                   "deadline (request_timeout_s), unauthorized (token), host (not a loopback Host), "
                                   "content_type (POST not JSON), queue_full (max_queued).", labels=["reason"])
    for reason, n in sorted(view["rejected"].items()):
        rejected.add_metric([reason], n)
    yield rejected
