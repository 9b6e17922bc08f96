"""200 ingestion tasks on real prefork, threads and solo workers, pooled and not.

Each test starts ``python -m celery ... worker`` on its own queue, with the
Bolt server behind a counting proxy, and checks what the issue promises:
every task succeeds, each worker loop created one driver (not one per task),
``inspect neopool_stats`` reports every process, the writes are all there,
and a warm shutdown closes every pool on its own loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from celery_helpers import TASKS, graph_counts, only_worker, settled_stats
from neopool.celery import cluster_stats
from neopool.testing import BoltTarget
from neopool.testing.proxy import TcpProxy
from neopool.testing.worker_process import CeleryWorkerProcess
from polling import eventually

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

ENTITIES = 3  # per task: 3 nodes, 2 relationships


def send_batch(app: Any, workspace: str, *, sync_every: int = 0) -> list[Any]:
    """Queue ``TASKS`` ingestion tasks; every ``sync_every``-th one is the sync variant."""
    results = []
    for i in range(TASKS):
        name = "neopool.testing.ingest"
        if sync_every and i % sync_every == 0:
            name = "neopool.testing.ingest_sync"
        results.append(app.send_task(name, args=[workspace, f"doc-{i}", ENTITIES]))
    return results


def collect(results: list[Any], timeout: float = 120.0) -> list[dict[str, Any]]:
    return [result.get(timeout=timeout) for result in results]


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 4), ("solo", 1)])
def test_tasks_reuse_one_driver_per_worker_loop(
    pool: str,
    concurrency: int,
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    bolt_proxy: TcpProxy,
    neopool_bolt: BoltTarget,
    workspace: str,
) -> None:
    worker = start_worker(pool, concurrency)

    # Started, configured, and not a single connection opened yet.
    before = only_worker(cluster_stats(celery_app), worker)
    if pool == "prefork":
        assert len(before) == concurrency, before  # every child reports, even idle
        assert str(worker.pid) not in before
    assert all(loops == {} for loops in before.values()), before
    assert bolt_proxy.connections_opened == 0

    outcomes = collect(send_batch(celery_app, workspace, sync_every=5))
    assert all(o["written"] == ENTITIES for o in outcomes)

    loops_used = {(str(o["pid"]), o["loop"]) for o in outcomes}
    assert len(loops_used) <= concurrency
    stats = settled_stats(celery_app, worker, TASKS)
    reported = {(pid, loop) for pid, loops in stats.items() for loop in loops}
    assert loops_used <= reported, (loops_used, stats)
    per_loop = [s for loops in stats.values() for s in loops.values()]
    assert [s["drivers_created"] for s in per_loop] == [1] * len(per_loop)
    assert sum(s["borrows"] for s in per_loop) == TASKS
    assert all(s["in_use"] == 0 for s in per_loop)
    if pool == "prefork":
        assert len(stats) == concurrency
        assert str(worker.pid) not in stats
    # A pool keeps pool_min_size (2) sockets warm and uses one per task at a time.
    assert bolt_proxy.connections_opened <= 4 * len(per_loop)

    database = outcomes[0]["database"]
    assert graph_counts(neopool_bolt.config(), database, workspace) == (
        TASKS * ENTITIES,
        TASKS * (ENTITIES - 1),
    )

    assert worker.stop() == 0
    log = worker.log()
    processes = [pid for pid, loops in stats.items() if loops]
    for pid in processes:
        assert f" {pid} shut down: closed" in log, worker.log_tail()
    assert "pool(s) left open" in log
    assert "1 pool(s) left open" not in log, worker.log_tail()
    assert "never returned" not in log, worker.log_tail()
    assert "still in use" not in log, worker.log_tail()
    # The worker has exited: the proxy sees its last connections end.
    assert eventually(lambda: bolt_proxy.active_connections == 0)


def test_new_driver_per_task_for_comparison(
    celery_app: Any,
    start_worker: Callable[..., CeleryWorkerProcess],
    bolt_proxy: TcpProxy,
    neopool_bolt: BoltTarget,
    workspace: str,
) -> None:
    """The design note's "before": the same writes, a driver opened and closed per task."""
    worker = start_worker("prefork", 2)
    results = [
        celery_app.send_task(
            "neopool.testing.ingest_new_driver", args=[workspace, f"doc-{i}", ENTITIES]
        )
        for i in range(TASKS)
    ]
    outcomes = collect(results)
    assert all(o["written"] == ENTITIES for o in outcomes)
    assert len({o["loop"] for o in outcomes}) > 2  # asyncio.run: a new loop per task
    assert bolt_proxy.connections_opened >= TASKS  # a new driver per task
    stats = only_worker(cluster_stats(celery_app), worker)
    assert all(loops == {} for loops in stats.values()), stats  # neopool was not used
    assert graph_counts(neopool_bolt.config(), outcomes[0]["database"], workspace) == (
        TASKS * ENTITIES,
        TASKS * (ENTITIES - 1),
    )
