"""Prometheus metrics for neopool's pools: ``pip install 'neopool[prometheus]'``.

Nothing is registered at import. Call :func:`register` once (or add a
:class:`NeopoolCollector` to your own registry); every scrape then reads each
loop pool's :class:`~neopool.stats.PoolStats` afresh, and the process-wide
:class:`~neopool.stats.ProcessTotals` (``neopool_loops_served_total``,
``neopool_drivers_created_total``... labelled by worker and pid), which keep
counting the loops and drivers that are gone. :func:`serve` starts a
``/metrics`` endpoint.

Under Celery prefork the pools live in the worker children, not in the process
you scrape; pass ``source=cluster_source(app)`` to report what every child
publishes through ``inspect neopool_stats`` and ``inspect neopool_totals``.
"""

from __future__ import annotations

import importlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from neopool import _fork
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PoolStats, ProcessTotals

__all__ = [
    "LABELS",
    "PROCESS_LABELS",
    "ClusterSource",
    "MetricsServer",
    "NeopoolCollector",
    "Sample",
    "StatsSource",
    "TotalsSample",
    "TotalsSource",
    "cluster_source",
    "local_source",
    "local_totals",
    "register",
    "serve",
    "unregister",
]

#: Labels on every per-loop series: Celery worker node ("" locally), process, loop, thread.
LABELS = ("worker", "pid", "loop", "thread")
#: Labels on every per-process series.
PROCESS_LABELS = ("worker", "pid")

#: One labelled stats snapshot per loop pool.
Sample = tuple[Mapping[str, str], PoolStats]
StatsSource = Callable[[], Iterable[Sample]]
#: One labelled totals snapshot per process.
TotalsSample = tuple[Mapping[str, str], ProcessTotals]
TotalsSource = Callable[[], Iterable[TotalsSample]]

_GAUGES = (
    ("available", "Leases ready to hand out."),
    ("in_use", "Leases held by borrowers."),
    ("total", "Leases in existence (available + in_use)."),
    ("waiting", "Borrowers waiting for a lease."),
    ("max_size", "pool_max_size: concurrent borrows allowed per loop."),
)
_COUNTERS = (
    ("borrows", "borrows", "Leases handed out."),
    ("timeouts", "timeouts", "Borrowers that gave up with PoolTimeout."),
    ("drivers_created", "drivers_created", "Neo4j drivers created by the loop pool."),
)
#: Process-wide counters (``neopool_<name>_total``): they keep the pools that are gone.
_TOTALS = (
    ("loops_served", "Event loops given a pool since the process started."),
    ("pools_closed", "Loop pools ended since the process started."),
    ("drivers_created", "Neo4j drivers opened since the process started."),
    ("drivers_closed", "Neo4j drivers closed (or released) since the process started."),
    ("borrows", "Leases handed out since the process started."),
    ("loop_blocks", "Times the process loop was blocked past blocked_loop_threshold."),
)


def local_source(registry: GlobalNeo4jConnectionPool | None = None) -> StatsSource:
    """The pools of this process's registry (reading stats is safe from any thread)."""

    def read() -> Iterator[Sample]:
        pools = (registry or GlobalNeo4jConnectionPool()).pools()
        pid = str(os.getpid())
        for pool in pools:
            stats = pool.stats()
            labels = {"worker": "", "pid": pid, "loop": pool.loop_id, "thread": stats["thread"]}
            yield labels, stats

    return read


def local_totals() -> TotalsSource:
    """This process's :class:`~neopool.stats.ProcessTotals`."""

    def read() -> Iterator[TotalsSample]:
        totals = GlobalNeo4jConnectionPool().process_totals()
        yield {"worker": "", "pid": str(totals["pid"])}, totals

    return read


class ClusterSource:
    """Every Celery worker child's pools and totals, as published through ``inspect``.

    Call it for the pools (``inspect neopool_stats``); :meth:`totals` reads
    ``inspect neopool_totals``. Each is one broadcast, waiting ``timeout``.
    """

    def __init__(self, app: Any, timeout: float = 2.0) -> None:
        self.app = app
        self.timeout = timeout

    def __call__(self) -> Iterator[Sample]:
        cluster_stats = importlib.import_module("neopool.celery").cluster_stats
        for worker, by_pid in cluster_stats(self.app, timeout=self.timeout).items():
            for pid, by_loop in by_pid.items():
                for loop_id, stats in by_loop.items():
                    labels = {
                        "worker": worker,
                        "pid": str(pid),
                        "loop": str(loop_id),
                        "thread": str(stats.get("thread", "")),
                    }
                    yield labels, stats

    def totals(self) -> Iterator[TotalsSample]:
        """Every worker process's totals."""
        cluster_totals = importlib.import_module("neopool.celery").cluster_totals
        for worker, by_pid in cluster_totals(self.app, timeout=self.timeout).items():
            for pid, totals in by_pid.items():
                yield {"worker": worker, "pid": str(pid)}, totals


def cluster_source(app: Any, timeout: float = 2.0) -> ClusterSource:
    """Every Celery worker child's pools (and totals), as published through ``inspect``."""
    return ClusterSource(app, timeout)


class NeopoolCollector(Collector):
    """Per-loop gauges and counters, and per-process totals, read at scrape time.

    ``totals`` defaults to the source's own (a :class:`ClusterSource`), else
    this process's.
    """

    def __init__(
        self,
        source: StatsSource | None = None,
        *,
        totals: TotalsSource | None = None,
        prefix: str = "neopool",
    ) -> None:
        self._source = source or local_source()
        if totals is None:
            totals = self._source.totals if isinstance(self._source, ClusterSource) else None
        self._totals = totals or local_totals()
        self._prefix = prefix

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples: registering never reads the pools."""
        return self._families().values()

    def collect(self) -> Iterable[Metric]:
        """One sample per loop pool for every family."""
        families = self._families()
        for labels, stats in self._source():
            values = [str(labels.get(name, "")) for name in LABELS]
            for key, _help in _GAUGES:
                families[key].add_metric(values, float(stats[key]))  # type: ignore[literal-required]
            for key, field, _help in _COUNTERS:
                families[key].add_metric(values, float(stats[field]))  # type: ignore[literal-required]
            families["wait_seconds"].add_metric(values, float(stats["wait_ms_total"]) / 1000.0)
            families["max_wait_seconds"].add_metric(values, float(stats["max_wait_ms"]) / 1000.0)
        for labels, totals in self._totals():
            values = [str(labels.get(name, "")) for name in PROCESS_LABELS]
            for key, _help in _TOTALS:
                families[f"process_{key}"].add_metric(values, float(totals[key]))  # type: ignore[literal-required]
        return families.values()

    def _families(self) -> dict[str, Any]:
        p = self._prefix
        families: dict[str, Any] = {}
        for key, help_text in _GAUGES:
            families[key] = GaugeMetricFamily(f"{p}_pool_{key}", help_text, labels=LABELS)
        for key, _field, help_text in _COUNTERS:
            families[key] = CounterMetricFamily(f"{p}_pool_{key}", help_text, labels=LABELS)
        families["wait_seconds"] = CounterMetricFamily(
            f"{p}_pool_wait_seconds", "Time borrowers spent waiting for a lease.", labels=LABELS
        )
        families["max_wait_seconds"] = GaugeMetricFamily(
            f"{p}_pool_max_wait_seconds", "The longest single wait for a lease.", labels=LABELS
        )
        for key, help_text in _TOTALS:
            families[f"process_{key}"] = CounterMetricFamily(
                f"{p}_{key}", help_text, labels=PROCESS_LABELS
            )
        return families


_registered: weakref.WeakKeyDictionary[CollectorRegistry, NeopoolCollector] = (
    weakref.WeakKeyDictionary()
)
_registered_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A parent thread inside register() at the fork holds the child's copy for good:
    # a register() or serve() in the child (a worker child serving its own metrics)
    # would wait forever. (prometheus_client's own registry lock, held by a parent
    # thread scraping at the fork, is that library's to remake: not done here.)
    global _registered_lock
    _registered_lock = threading.Lock()


_fork.add_step(_fork.Step.METRICS, _after_fork_in_child)


def register(
    registry: CollectorRegistry = REGISTRY, source: StatsSource | None = None
) -> NeopoolCollector:
    """Add a :class:`NeopoolCollector` to ``registry`` once; later calls return it."""
    with _registered_lock:
        collector = _registered.get(registry)
        if collector is None:
            collector = NeopoolCollector(source)
            registry.register(collector)
            _registered[registry] = collector
        return collector


def unregister(registry: CollectorRegistry = REGISTRY) -> None:
    """Remove the collector :func:`register` added to ``registry``, if any."""
    with _registered_lock:
        collector = _registered.pop(registry, None)
    if collector is not None:
        registry.unregister(collector)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``stop()`` shuts it down."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    registry: CollectorRegistry = REGISTRY,
    source: StatsSource | None = None,
) -> MetricsServer:
    """Register the collector (once) and serve ``registry`` over HTTP.

    ``port=0`` picks a free port; read it from the returned server. Binds to
    loopback unless told otherwise, so metrics are not exposed by accident.
    """
    register(registry, source)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(server.server_port), server, thread)
