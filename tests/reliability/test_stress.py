"""Stress and soak: many loops at once, random cancellation, and a long run of cycles."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from neopool import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    PoolStats,
)
from user_code import Runner

from .conftest import open_fds

THREADS = 16
BORROWS_PER_THREAD = 200
SOAK_CYCLES = 10_000
#: Hard cap for the stress run: reaching it means a deadlock, not slowness.
STRESS_CAP = 150.0


@pytest.fixture
def registry(configure: Callable[..., Neo4jConnectionConfig]) -> GlobalNeo4jConnectionPool:
    configure(pool_max_size=3, pool_min_size=1, max_connection_pool_size=4, borrow_timeout=60.0)
    return GlobalNeo4jConnectionPool()


async def _query_once() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        async with driver.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()


async def _thread_main(seed: int, report: dict[str, Any]) -> None:
    """Six concurrent borrowers share 200 borrows; a random third of them is cancelled."""
    rng = random.Random(seed)
    remaining = BORROWS_PER_THREAD
    cancelled = 0

    async def worker() -> None:
        nonlocal remaining, cancelled
        while remaining > 0:
            remaining -= 1
            attempt = asyncio.ensure_future(_query_once())
            if rng.random() < 0.33:
                await asyncio.sleep(rng.random() * 0.003)  # waiting, holding or mid-query
                attempt.cancel()
            try:
                await attempt
            except asyncio.CancelledError:
                cancelled += 1

    await asyncio.gather(*(worker() for _ in range(6)))
    pool = await GlobalNeo4jConnectionPool().get_pool()
    report["stats"] = pool.stats()
    report["cancelled"] = cancelled


@pytest.mark.slow
@pytest.mark.timeout(STRESS_CAP + 30)
def test_sixteen_loops_with_random_cancellation_neither_deadlock_nor_leak(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    reports: list[dict[str, Any]] = [{} for _ in range(THREADS)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            asyncio.run(_thread_main(index, reports[index]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STRESS_CAP)
    assert not any(t.is_alive() for t in threads), "deadlock: a loop did not finish in time"
    assert not errors, errors
    stats: list[PoolStats] = [r["stats"] for r in reports]
    for s in stats:
        assert s["in_use"] == 0, "a lease was lost"
        assert s["available"] == s["total"] <= s["max_size"]
        assert s["borrows"] <= BORROWS_PER_THREAD
    assert sum(r["cancelled"] for r in reports) > 0
    assert GlobalNeo4jConnectionPool().pools() == []  # every asyncio.run closed its pool


async def _soak(cycles: int, concurrency: int) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            await _query_once()

    await asyncio.gather(*(worker(cycles // concurrency) for _ in range(concurrency)))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_borrow_query_return_cycles_keep_memory_and_descriptors_flat(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    with Runner() as runner:
        runner.run(_soak(1_000, 4))  # warm: driver, sockets, caches, allocator arenas
        gc.collect()
        rss_before, fds_before = _rss(), open_fds()
        runner.run(_soak(SOAK_CYCLES, 4))
        gc.collect()
        rss_after, fds_after = _rss(), open_fds()
        stats = runner.run(GlobalNeo4jConnectionPool().get_pool_stats())
    (pool_stats,) = stats.values()
    assert pool_stats["borrows"] == 1_000 + SOAK_CYCLES
    assert pool_stats["in_use"] == 0
    assert pool_stats["drivers_created"] == 1
    assert rss_after - rss_before < 5 * 1024 * 1024, f"grew {rss_after - rss_before} bytes"
    assert fds_after <= fds_before


@pytest.mark.timeout(60)
def test_uvloop_loops_work_like_asyncio_loops(registry: GlobalNeo4jConnectionPool) -> None:
    uv = pytest.importorskip("uvloop")

    async def body() -> PoolStats:
        await asyncio.gather(*(_query_once() for _ in range(8)))
        pool = await GlobalNeo4jConnectionPool().get_pool()
        assert type(pool.loop).__module__.startswith("uvloop")
        return pool.stats()

    stats = uv.run(body())  # graceful teardown through shutdown_asyncgens
    assert stats["borrows"] == 8
    assert stats["in_use"] == 0
    assert stats["total"] <= stats["max_size"]
    assert GlobalNeo4jConnectionPool().pools() == []

    fds = open_fds()
    for _ in range(3):  # closed the wrong way: swept and released like asyncio loops
        loop = uv.new_event_loop()
        loop.run_until_complete(body())
        loop.close()
        del loop
        gc.collect()
    uv.run(body())
    gc.collect()
    assert GlobalNeo4jConnectionPool().pools() == []
    assert open_fds() <= fds
