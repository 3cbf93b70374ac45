"""Prometheus metrics, read from the scheduler's live state at scrape time."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..protocol.fraction import occupancy
from .scheduler import GRANTED, QUEUED


class BrokerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, broker):
        self.broker = broker
        # Counters reset with the process, which Prometheus' rate() handles.
        self.grants = 0
        self.ends: Counter = Counter()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.wait = Histogram(
            "elastic_gpu_lease_wait_seconds",
            "Time from a lease request to its grant",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )

    def granted(self, lease):
        self.grants += 1
        self.wait.observe(max(0.0, lease.granted_at - lease.created))

    def ended(self, lease):
        self.ends[lease.reason] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):
        sched = self.broker.scheduler
        alive = [a for a in sched.agents.values() if a.alive]
        yield _gauge("elastic_gpu_agents", "Agents alive", len(alive))
        yield _gauge("elastic_gpu_gpus", "GPUs in the pool", sum(len(a.gpus) for a in alive))
        slices = sched.gpu_slices()
        allocated = sum(occupancy(x.fraction for x in held) for held in slices.values())
        yield _gauge("elastic_gpu_gpus_allocated", "GPUs' worth of slices leased", allocated)
        leases = GaugeMetricFamily("elastic_gpu_leases", "Active leases", labels=["state"])
        for state in (GRANTED, QUEUED):
            leases.add_metric([state], sum(x.state == state for x in sched.leases.values()))
        yield leases
        in_use = GaugeMetricFamily("elastic_gpu_user_gpus", "GPUs leased per user", labels=["user"])
        per_user = Counter()
        for x in sched.leases.values():
            if x.state == GRANTED:
                per_user[x.user] += x.fraction
        for user, gpus in sorted(per_user.items()):
            in_use.add_metric([user], gpus)
        yield in_use
        yield CounterMetricFamily("elastic_gpu_lease_grants", "Leases granted", value=self.grants)
        ends = CounterMetricFamily("elastic_gpu_lease_ends", "Leases ended", labels=["reason"])
        for reason, n in sorted(self.ends.items()):
            ends.add_metric([reason or "unknown"], n)
        yield ends


def _gauge(name, doc, value):
    return GaugeMetricFamily(name, doc, value=value)
