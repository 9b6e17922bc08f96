"""GlobalNeo4jConnectionPool: one pool per live event loop, closed with its loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import warnings
from collections.abc import Callable

import pytest

import neopool
from neopool import (
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    NoRunningLoop,
    PoolStats,
)
from neopool._release import driver_is_closed
from neopool.runner import close_thread_loop
from neopool.stats import LoopChurnMonitor
from user_code import Runner, one_query


def open_descriptors() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def test_constructing_the_registry_again_never_resets_it(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    config = GlobalNeo4jConnectionPool.get_config()
    again = GlobalNeo4jConnectionPool()
    assert again is neopool_registry
    assert GlobalNeo4jConnectionPool.get_config() is config


async def test_each_loop_gets_its_own_pool_and_driver(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    here = await neopool_registry.get_pool()
    assert await neopool_registry.get_pool() is here

    def other_loop() -> tuple[int, int]:
        async def main() -> tuple[int, int]:
            pool = await GlobalNeo4jConnectionPool().get_pool()
            lease = await pool.borrow()
            driver = await lease.get_driver()
            await pool.return_connection(lease)
            return id(pool), id(driver)

        return asyncio.run(main())

    lease = await here.borrow()
    my_driver = await lease.get_driver()
    other_pool, other_driver = await asyncio.to_thread(other_loop)
    assert other_pool != id(here)
    assert other_driver != id(my_driver)
    await here.return_connection(lease)


def test_a_hundred_asyncio_runs_leave_no_descriptor_and_no_pool(
    neopool_registry: GlobalNeo4jConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    assert asyncio.run(one_query()) == 1  # imports and first-use caches settle
    gc.collect()
    before = open_descriptors()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(100):
            assert asyncio.run(one_query()) == 1
        gc.collect()
    after = open_descriptors()
    assert after == before, f"{after - before} descriptors leaked over 100 loops"
    assert neopool_registry.pools() == []
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    for bad in ("Event loop is closed", "attached to a different loop", "unclosed", "never"):
        assert bad not in caplog.text


def _churn_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "nothing is reused" in r.getMessage()]


def test_a_new_loop_per_task_is_called_out_once_because_nothing_is_reused(
    neopool_registry: GlobalNeo4jConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    for _ in range(LoopChurnMonitor.IN_A_ROW - 1):
        assert asyncio.run(one_query()) == 1  # asyncio.run per task: the note's mistake
    assert _churn_warnings(caplog) == []  # a few short loops are no pattern yet

    for _ in range(2 * LoopChurnMonitor.IN_A_ROW):
        assert asyncio.run(one_query()) == 1
    (warning,) = _churn_warnings(caplog)  # once per process, not once per loop
    assert "neopool.run()" in warning
    assert "AsyncTask" in warning


def test_loops_closed_without_teardown_count_as_thrown_away_too(
    neopool_registry: GlobalNeo4jConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    for _ in range(LoopChurnMonitor.IN_A_ROW + 1):  # each new pool sweeps the last dead one
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(one_query()) == 1
        loop.close()
    assert len(_churn_warnings(caplog)) == 1
    asyncio.run(neopool_registry.get_pool_stats())  # sweep the last one


def test_one_persistent_loop_per_thread_is_not_churn(
    neopool_registry: GlobalNeo4jConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    try:
        for _ in range(2 * LoopChurnMonitor.IN_A_ROW):
            assert neopool.run(one_query()) == 1
    finally:
        close_thread_loop()
    assert _churn_warnings(caplog) == []
    assert neopool_registry.pools() == []


def test_asyncio_runner_closes_the_pool_gracefully_before_its_loop(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    pools = []

    async def remember_pool() -> None:
        pools.append(await neopool_registry.get_pool())
        await one_query()

    with Runner() as runner:
        runner.run(remember_pool())
        runner.run(remember_pool())  # same loop: same pool, same driver
        assert pools[0] is pools[1]
        assert pools[0].stats()["drivers_created"] == 1
        driver = pools[0].driver
        assert driver is not None
        assert not driver_is_closed(driver)
    assert pools[0].closed
    assert driver_is_closed(driver)  # by driver.close(), on the loop, before the loop closed
    assert neopool_registry.pools() == []


def test_eight_threads_with_twenty_borrowers_each_share_nothing_and_lose_nothing(
    configure: Callable[..., Neo4jConnectionConfig],
) -> None:
    configure(pool_max_size=3, pool_min_size=1)
    results: dict[str, tuple[list[int], PoolStats]] = {}
    errors: list[BaseException] = []

    async def borrower(number: int, served: list[int]) -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            served.append(number)
            driver = await borrowed.get_driver()
            await driver.execute_query("RETURN $n AS n", n=number, database_="neo4j")

    async def loop_main() -> None:
        served: list[int] = []
        await asyncio.gather(*(borrower(number, served) for number in range(20)))
        pool = await GlobalNeo4jConnectionPool().get_pool()
        results[threading.current_thread().name] = (served, pool.stats())

    def thread_main() -> None:
        try:
            asyncio.run(loop_main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, name=f"loop-{i}") for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(results) == 8
    for served, stats in results.values():
        assert served == list(range(20)), "waiters must be served first in, first out"
        assert stats["drivers_created"] == 1
        assert stats["borrows"] == 20
        assert (stats["in_use"], stats["waiting"]) == (0, 0)
        assert stats["total"] <= 3
    assert GlobalNeo4jConnectionPool().pools() == []


async def test_stats_cover_every_live_loop_of_the_process(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    started = threading.Event()
    release = threading.Event()

    def idle_loop_with_a_pool() -> None:
        async def main() -> None:
            await one_query()
            started.set()
            await asyncio.to_thread(release.wait)

        asyncio.run(main())

    thread = threading.Thread(target=idle_loop_with_a_pool)
    thread.start()
    await asyncio.to_thread(started.wait)
    await one_query()
    stats = await Neo4jConnectionFactory.get_pool_stats()
    release.set()
    await asyncio.to_thread(thread.join)
    assert len(stats) == 2
    assert str(id(asyncio.get_running_loop())) in stats
    assert {s["thread"] for s in stats.values()} == {thread.name, "MainThread"}


def test_close_all_pools_closes_pools_of_running_loops_on_their_own_loop(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    started = threading.Event()
    stop = asyncio.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    def worker() -> None:
        async def main() -> None:
            holder["loop"] = asyncio.get_running_loop()
            await one_query()
            started.set()
            await stop.wait()

        asyncio.run(main())

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(30)
    (pool,) = neopool_registry.pools()
    driver = pool.driver
    assert driver is not None

    async def shutdown() -> None:
        await neopool_registry.close_all_pools()

    asyncio.run(shutdown())
    assert pool.closed
    assert driver_is_closed(driver)  # by driver.close() on its loop, not released without I/O
    assert neopool_registry.pools() == []
    assert holder["loop"].is_running()  # the loop itself lives on
    holder["loop"].call_soon_threadsafe(stop.set)
    thread.join(30)
    assert not thread.is_alive()


def test_get_pool_outside_a_running_loop_is_a_clear_error() -> None:
    coroutine = GlobalNeo4jConnectionPool().get_pool()
    with pytest.raises(NoRunningLoop, match="needs a running event loop"):
        coroutine.send(None)
    coroutine.close()


def test_without_config_the_environment_is_read_or_the_error_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch, neopool_registry: GlobalNeo4jConnectionPool
) -> None:
    from neopool import ConfigError
    from neopool.testing import reset_registry

    reset_registry()
    monkeypatch.delenv("NEO4J_URI", raising=False)
    with pytest.raises(ConfigError, match=r"call GlobalNeo4jConnectionPool\.set_config"):
        GlobalNeo4jConnectionPool.get_config()
    monkeypatch.setenv("NEO4J_URI", "bolt://from-env:7687")
    assert GlobalNeo4jConnectionPool.get_config().uri == "bolt://from-env:7687"
