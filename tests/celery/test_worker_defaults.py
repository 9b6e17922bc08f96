"""Real workers on neopool's defaults: sizing, what they say at start, churn and blocks in numbers.

Each test starts ``celery -A defaults_app worker`` (the test app with the pool
sizes left to neopool's defaults) on its own queue.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from celery_helpers import only_worker
from neopool.celery import cluster_stats, cluster_totals, setup
from neopool.errors import ConfigError
from neopool.metrics import NeopoolCollector, cluster_source
from neopool.testing.worker_process import CeleryWorkerProcess
from polling import eventually

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

HERE = Path(__file__).resolve().parent


@pytest.fixture
def start_defaults_worker(
    start_worker: Callable[..., CeleryWorkerProcess],
) -> Callable[..., CeleryWorkerProcess]:
    def start(pool: str, concurrency: int, **env: str) -> CeleryWorkerProcess:
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        environment = {"PYTHONPATH": path, **env}
        return start_worker(pool, concurrency, env=environment, app_module="defaults_app")

    return start


def test_the_process_loop_under_threads_sizes_the_pool_to_the_concurrency(
    celery_app: Any, start_defaults_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """``-c 16`` in the process-loop mode: 16 tasks hold a lease at once, no one waits."""
    worker = start_defaults_worker("threads", 16, NEOPOOL_CELERY_LOOP="process")
    for _ in range(3):  # waves of 16 tasks in flight at once
        sent = [
            celery_app.send_task("neopool.testing.borrow_and_hold", args=[0.3]) for _ in range(16)
        ]
        outcomes = [s.get(timeout=60) for s in sent]
        assert len({o["loop"] for o in outcomes}) == 1
    ((loops),) = only_worker(cluster_stats(celery_app), worker).values()
    ((stats),) = loops.values()
    assert stats["max_size"] == 16
    assert stats["timeouts"] == 0
    assert worker.stop() == 0
    log = worker.log()
    assert "pool_max_size 16 (the worker's concurrency)" in log, worker.log_tail()
    assert "pool exhausted" not in log, worker.log_tail()
    assert "high utilisation" in log or stats["max_wait_ms"] == 0
    assert log.count("neopool: loop mode 'process' (as set)") == 1, worker.log_tail()
    assert "task_time_limit" in log  # the threads pool's trade-off, said at start


def test_an_explicit_pool_max_size_is_kept(
    celery_app: Any, start_defaults_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_defaults_worker(
        "threads", 16, NEOPOOL_CELERY_LOOP="process", NEOPOOL_TEST_POOL_MAX_SIZE="4"
    )
    celery_app.send_task("neopool.testing.borrow_and_hold", args=[0]).get(timeout=60)
    ((loops),) = only_worker(cluster_stats(celery_app), worker).values()
    ((stats),) = loops.values()
    assert stats["max_size"] == 4
    assert worker.stop() == 0
    assert "pool_max_size is 4, below the worker's concurrency (16)" in worker.log()


def test_the_thread_mode_says_what_it_is_once(
    celery_app: Any, start_defaults_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_defaults_worker("threads", 2)
    celery_app.send_task("neopool.testing.borrow_and_hold", args=[0]).get(timeout=60)
    assert worker.stop() == 0
    log = worker.log()
    assert log.count("neopool: loop mode 'thread' (the default;") == 1, worker.log_tail()
    assert "NEOPOOL_CELERY_LOOP=process" in log


def test_a_new_loop_per_task_shows_in_the_cluster_totals(
    celery_app: Any, start_defaults_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    """``asyncio.run`` per task: the live pools show nothing, the totals show 20 of each."""
    worker = start_defaults_worker("threads", 2)
    results = [celery_app.send_task("neopool.testing.query_in_new_loop") for _ in range(20)]
    outcomes = [r.get(timeout=60) for r in results]
    assert len({o["loop"] for o in outcomes}) > 2
    stats = only_worker(cluster_stats(celery_app), worker)
    assert stats == {str(worker.pid): {}}  # every loop is gone with its pool
    totals = only_worker(cluster_totals(celery_app), worker)
    (mine,) = totals.values()
    assert mine["pid"] == worker.pid
    assert mine["loops_served"] == 20
    assert mine["drivers_created"] == 20
    assert mine["drivers_closed"] == 20
    assert mine["borrows"] == 20

    registry = CollectorRegistry()
    registry.register(NeopoolCollector(cluster_source(celery_app)))
    labels = {"worker": worker.nodename, "pid": str(worker.pid)}
    assert registry.get_sample_value("neopool_loops_served_total", labels) == 20
    assert registry.get_sample_value("neopool_drivers_created_total", labels) == 20
    assert worker.stop() == 0


@pytest.mark.timing
def test_a_blocked_process_loop_is_named_in_the_worker_log(
    celery_app: Any, start_defaults_worker: Callable[..., CeleryWorkerProcess]
) -> None:
    worker = start_defaults_worker("threads", 4, NEOPOOL_CELERY_LOOP="process")
    for _ in range(3):
        celery_app.send_task("neopool.testing.block_the_loop", args=[0.8]).get(timeout=60)
    assert eventually(
        lambda: only_worker(cluster_totals(celery_app), worker)[str(worker.pid)]["loop_blocks"] >= 3
    )
    assert worker.stop() == 0
    blocked = [line for line in worker.log().splitlines() if "process loop was blocked" in line]
    assert len(blocked) == 1, blocked  # one call site: said once
    assert f"lookup_synchronously() at {HERE / 'defaults_app.py'}:" in blocked[0]
    assert "called from coroutine block_the_loop()" in blocked[0]


def test_setup_checks_its_arguments() -> None:
    from celery import Celery

    app = Celery("neopool-setup-check")
    with pytest.raises(ConfigError, match="loop must be one of thread, process, not 'processes'"):
        setup(app, loop="processes")  # type: ignore[arg-type]
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="shutdown_timeout"):
            setup(app, shutdown_timeout=bad)
