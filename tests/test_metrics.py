"""neopool.metrics against a real registry, a real server and a real HTTP scrape."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="needs the 'prometheus' extra")

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from neopool import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    PoolTimeout,
)
from neopool.metrics import NeopoolCollector, cluster_source, register, serve, unregister
from neopool.testing import BoltTarget
from polling import eventually, eventually_async


def scrape(url: str) -> dict[tuple[str, str], float]:
    """``{(sample name, loop label): value}`` from a real /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("neopool_"):
                samples[(sample.name, sample.labels.get("loop", ""))] = sample.value
    return samples


async def test_scrape_shows_each_loop_pool(neopool_registry: GlobalNeo4jConnectionPool) -> None:
    registry = CollectorRegistry()
    server = serve(0, registry=registry)
    try:
        lease = await neopool_registry.borrow_connection()
        loop_id = lease.loop_id
        held = await asyncio.to_thread(scrape, server.url)
        await neopool_registry.return_connection(lease)
        for _ in range(4):
            async with Neo4jConnectionFactory.borrow_connection():
                pass
        after = await asyncio.to_thread(scrape, server.url)
    finally:
        server.stop()

    assert held[("neopool_pool_in_use", loop_id)] == 1
    assert held[("neopool_pool_waiting", loop_id)] == 0
    assert held[("neopool_pool_drivers_created_total", loop_id)] == 1
    assert after[("neopool_pool_in_use", loop_id)] == 0
    assert after[("neopool_pool_borrows_total", loop_id)] == 5
    assert after[("neopool_pool_total", loop_id)] == after[("neopool_pool_available", loop_id)]
    assert after[("neopool_pool_max_size", loop_id)] == 10


async def test_timeouts_and_wait_seconds_are_counted(
    configure: Callable[..., Neo4jConnectionConfig],
) -> None:
    configure(pool_max_size=1, pool_min_size=0)
    registry = CollectorRegistry()
    collector = NeopoolCollector()
    registry.register(collector)
    try:
        pool = GlobalNeo4jConnectionPool()
        held = await pool.borrow_connection()
        with pytest.raises(PoolTimeout):
            await pool.borrow_connection(timeout=0.05)
        waiter = asyncio.ensure_future(pool.borrow_connection(timeout=5))
        assert await eventually_async(lambda: held.pool.waiting == 1)
        await asyncio.sleep(0.05)  # the waiter waits a while: a time to count
        labels = {
            "worker": "",
            "pid": str(os.getpid()),
            "loop": held.loop_id,
            "thread": "MainThread",
        }
        waiting = registry.get_sample_value("neopool_pool_waiting", labels)
        await pool.return_connection(held)
        await pool.return_connection(await waiter)
        assert waiting == 1
        assert registry.get_sample_value("neopool_pool_timeouts_total", labels) == 1
        wait = registry.get_sample_value("neopool_pool_wait_seconds_total", labels)
        assert wait is not None
        assert wait >= 0.09
        longest = registry.get_sample_value("neopool_pool_max_wait_seconds", labels)
        assert longest is not None
        assert longest >= 0.045
    finally:
        registry.unregister(collector)


def test_process_totals_count_the_loops_that_are_gone(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    """A new loop per call: the per-loop series are gone, the process counters are not."""
    registry = CollectorRegistry()
    registry.register(NeopoolCollector())
    labels = {"worker": "", "pid": str(os.getpid())}

    def read(name: str) -> float:
        value = registry.get_sample_value(f"neopool_{name}_total", labels)
        assert value is not None, name
        return value

    before = {name: read(name) for name in ("loops_served", "drivers_created", "borrows")}

    async def one_borrow() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()

    for _ in range(5):
        asyncio.run(one_borrow())
    assert {name: read(name) - before[name] for name in before} == {
        "loops_served": 5,
        "drivers_created": 5,
        "borrows": 5,
    }
    assert read("drivers_closed") >= 5
    assert registry.get_sample_value("neopool_pool_in_use", {**labels, "loop": "x"}) is None


def test_register_is_idempotent_and_empty_without_pools() -> None:
    registry = CollectorRegistry()
    first = register(registry)
    try:
        assert register(registry) is first
        families = {m.name for m in registry.collect()}
        assert "neopool_pool_in_use" in families
        assert registry.get_sample_value("neopool_pool_borrows_total") is None
    finally:
        unregister(registry)
    assert "neopool_pool_in_use" not in {m.name for m in registry.collect()}


@pytest.mark.subprocess
def test_import_registers_nothing() -> None:
    code = (
        "import neopool.metrics, prometheus_client;"
        "print(prometheus_client.generate_latest().decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "neopool_" not in out


@pytest.mark.celery
def test_cluster_source_reports_prefork_children(
    neopool_bolt: BoltTarget, neopool_broker_url: str
) -> None:
    """Under prefork the pools live in the children: the collector reads what they publish."""
    from neopool.testing.celery_app import make_app
    from neopool.testing.worker_process import CeleryWorkerProcess

    queue = f"neopool-metrics-{uuid.uuid4().hex[:8]}"
    config = neopool_bolt.config()
    app = make_app(neopool_broker_url, config, queue=queue, main=queue)
    registry = CollectorRegistry()
    registry.register(NeopoolCollector(cluster_source(app, timeout=3.0)))
    with CeleryWorkerProcess(app, config, pool="prefork", concurrency=2, queue=queue):
        results = [
            app.send_task("neopool.testing.ingest", args=["metrics", f"doc-{i}", 2])
            for i in range(6)
        ]
        for result in results:
            result.get(timeout=60)
        # A child publishes after each task (task_postrun), just after its result is stored.
        # The broker may serve other workers too (as a cluster's does): read this one's.
        node = f"{queue}@localhost"
        families: dict[str, Any] = {}

        def mine(name: str) -> list[Any]:
            return [s for s in families[name].samples if s.labels["worker"] == node]

        def six_borrows_published() -> bool:
            families.clear()
            families.update((f.name, f) for f in registry.collect())
            return sum(s.value for s in mine("neopool_pool_borrows")) == 6

        eventually(six_borrows_published, timeout=30)
    borrows = mine("neopool_pool_borrows")
    assert sum(s.value for s in borrows) == 6, [(s.labels, s.value) for s in borrows]
    assert all(s.labels["pid"].isdigit() for s in borrows)
    drivers = mine("neopool_pool_drivers_created")
    assert sum(s.value for s in drivers) <= 2  # one driver per child process, at most
    # The children's totals come through too, one series per child.
    totals = mine("neopool_borrows")
    assert sum(s.value for s in totals) == 6
    assert {s.labels["pid"] for s in totals} == {s.labels["pid"] for s in borrows}
    assert sum(s.value for s in mine("neopool_loops_served")) <= 2
