"""Prometheus metrics, recorded at the RPC boundary and the engine step boundary only.

No label carries an adapter name or anything else a user controls; the only labels are ``status``
(a gRPC status code name) and ``tier`` (``host`` | ``device``). Values are in base units (seconds,
samples, adapters). Gauges and pool counters are read from the live objects at scrape time by
:class:`RuntimeCollector`, so they are never stale and cost nothing between scrapes.

=================================  =========  ===================================================
metric                             type       meaning
=================================  =========  ===================================================
deft_requests_total{status}        counter    generation RPCs by final status (ok, invalid_argument, …)
deft_request_latency_seconds       histogram  end to end, for requests the engine accepted
deft_queue_wait_seconds            histogram  submission → first denoising step
deft_denoise_step_seconds          histogram  one batched denoiser forward
deft_batch_size                    histogram  samples (rows, CFG rows included) per forward
deft_batch_distinct_adapters       histogram  distinct adapters per forward
deft_images_generated_total        counter    images returned
deft_requests_running              gauge      requests denoising now
deft_requests_waiting              gauge      requests queued or loading adapters
deft_adapters_registered           gauge      adapters in the registry
deft_adapters_resident{tier}       gauge      adapters held in host memory / device pages
deft_adapter_loads_total{tier}     counter    adapter loads into each tier (a CPU pool reads files straight into device pages)
deft_adapter_load_seconds          histogram  reading one adapter's compiled factors from disk
deft_adapter_evictions_total{tier} counter    adapters evicted from each tier
deft_adapter_cache_hits_total      counter    acquisitions that found the adapter on the device
deft_adapter_cache_misses_total    counter    acquisitions that had to load it
=================================  =========  ===================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deft_runtime.pool import AdapterPool

# Generation can take tens of minutes on a busy server with large models.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DISTINCT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class LiveRuntime(Protocol):
    """What the collector reads at scrape time (the server's loaded runtime)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def registered(self) -> int: ...
    @property
    def pool(self) -> AdapterPool: ...


class RuntimeCollector(Collector):
    """Gauges and pool counters computed from the live runtime on each scrape (zeros while loading)."""

    def __init__(self) -> None:
        self.runtime: LiveRuntime | None = None

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        yield _gauge("deft_requests_running", "Requests denoising now.", rt.running if rt else 0)
        yield _gauge("deft_requests_waiting", "Requests queued or loading adapters.", rt.waiting if rt else 0)
        yield _gauge("deft_adapters_registered", "Adapters in the registry.", rt.registered if rt else 0)
        resident = rt.pool.resident_count() if rt else {"host": 0, "device": 0}
        stats = rt.pool.stats if rt else None
        tiered = GaugeMetricFamily("deft_adapters_resident", "Adapters held per tier.", labels=["tier"])
        for tier in ("host", "device"):
            tiered.add_metric([tier], resident[tier])
        yield tiered
        yield _tier_counter("deft_adapter_loads", "Adapter loads per tier.", stats.loads if stats else None)
        yield _tier_counter(
            "deft_adapter_evictions", "Adapter evictions per tier.", stats.evictions if stats else None
        )
        yield CounterMetricFamily(
            "deft_adapter_cache_hits",
            "Acquisitions that found the adapter on the device.",
            stats.hits if stats else 0,
        )
        yield CounterMetricFamily(
            "deft_adapter_cache_misses",
            "Acquisitions that had to load the adapter.",
            stats.misses if stats else 0,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _tier_counter(name: str, documentation: str, values: dict[str, int] | None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["tier"])
    for tier in ("host", "device"):
        family.add_metric([tier], (values or {}).get(tier, 0))
    return family


class ServerMetrics:
    """The server's collectors in their own registry; also the engine's :class:`EngineObserver`."""

    def __init__(self, tenant_labels: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: ``--metrics-tenant-labels``: request series per tenant (unbounded tenants = unbounded series)
        self.tenant_labels = tenant_labels
        by_tenant = ["tenant"] if tenant_labels else []
        self.requests = Counter(
            "deft_requests", "Generation RPCs by final status.", ["status", *by_tenant], registry=r
        )
        self.latency = Histogram(
            "deft_request_latency_seconds",
            "End-to-end generation latency.",
            by_tenant,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "deft_queue_wait_seconds",
            "Submission to first denoising step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "deft_denoise_step_seconds", "One batched denoiser forward.", buckets=STEP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "deft_batch_size", "Samples per denoiser forward.", buckets=BATCH_BUCKETS, registry=r
        )
        self.distinct = Histogram(
            "deft_batch_distinct_adapters",
            "Distinct adapters per forward.",
            buckets=DISTINCT_BUCKETS,
            registry=r,
        )
        self.images = Counter("deft_images_generated", "Images returned.", registry=r)
        self.adapter_load = Histogram(
            "deft_adapter_load_seconds",
            "Reading an adapter's compiled factors.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.live = RuntimeCollector()
        r.register(self.live)

    # --- RPC boundary
    def request_finished(self, status: str, latency_s: float | None, tenant: str = "") -> None:
        """One generation RPC of ``tenant`` ended with ``status``; ``latency_s`` if the engine accepted it.

        ``tenant`` becomes a label value only with ``--metrics-tenant-labels``; otherwise it is ignored.
        """
        labels = {"tenant": tenant} if self.tenant_labels else {}
        self.requests.labels(status=status, **labels).inc()
        if latency_s is not None:
            (self.latency.labels(**labels) if labels else self.latency).observe(latency_s)

    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_load.observe(seconds)

    # --- EngineObserver (engine thread; cheap)
    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None:
        self.step.observe(seconds)
        self.batch_size.observe(rows)
        self.distinct.observe(distinct_adapters)

    def on_request_done(self, status: str, latency_s: float, queue_s: float, images: int) -> None:
        self.queue_wait.observe(queue_s)
        if images:
            self.images.inc(images)

    def on_queue(self, waiting: int, running: int) -> None:
        """Unused: the gauges are read at scrape time."""
