"""Event loops closed the wrong way: nothing leaks, nothing raises, no dead pool is reused."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from neopool import (
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    PooledConnectionManager,
)
from neopool._release import driver_is_closed
from neopool.testing import TcpProxy
from polling import eventually
from user_code import one_query

from .conftest import open_fds

pytestmark = pytest.mark.timeout(90)


def _run_like_many_celery_apps(body: Any) -> Any:
    """new_event_loop + run_until_complete + close(): no shutdown_asyncgens, no pool close."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(body())
    finally:
        loop.close()


def _leak_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if "was never returned" in r.getMessage() or "still in use" in r.getMessage()
    ]


def test_loops_closed_without_teardown_release_their_sockets_at_the_next_pool(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, unraisable: list[Any]
) -> None:
    before = open_fds()
    _run_like_many_celery_apps(one_query)
    steady = open_fds()
    assert steady > before  # the dead loop's sockets are still open, until someone looks
    for _ in range(5):
        _run_like_many_celery_apps(one_query)
        gc.collect()
        # each new pool released the previous dead loop's sockets (the proxy follows)
        assert eventually(lambda: open_fds() <= steady)

    asyncio.run(one_query())  # a well-behaved loop: sweeps the last dead one, closes its own
    gc.collect()
    assert GlobalNeo4jConnectionPool().pools() == []
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    # The proxy runs in this process and closes its two sockets per connection in its
    # own thread, a moment after the driver's side: count once it has.
    assert eventually(lambda: open_fds() <= before)


async def _borrow_and_keep() -> PooledConnectionManager:
    pool = await GlobalNeo4jConnectionPool().get_pool()
    return await pool.borrow()  # never returned


def test_a_lease_out_when_its_loop_dies_unclosed_is_reported_once_with_its_borrow_site(
    proxied_config: Neo4jConnectionConfig,
    caplog: pytest.LogCaptureFixture,
    neopool_proxy: TcpProxy,
    unraisable: list[Any],
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    lease = _run_like_many_celery_apps(_borrow_and_keep)
    assert lease.borrowed_at.startswith(__file__)
    assert "_borrow_and_keep" in lease.borrowed_at
    del lease
    gc.collect()  # the loop is collected too, as far as user code is concerned

    asyncio.run(one_query())  # the next pool sweeps the dead loop
    asyncio.run(GlobalNeo4jConnectionPool().get_pool_stats())  # and any later look
    gc.collect()

    leaks = _leak_warnings(caplog)
    assert len(leaks) == 1
    assert __file__ in leaks[0].getMessage()
    assert "_borrow_and_keep" in leaks[0].getMessage()
    assert eventually(lambda: neopool_proxy.active_connections == 0)


def test_a_lease_out_when_asyncio_run_ends_is_reported_once_with_its_borrow_site(
    proxied_config: Neo4jConnectionConfig,
    caplog: pytest.LogCaptureFixture,
    neopool_proxy: TcpProxy,
    unraisable: list[Any],
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    lease = asyncio.run(_borrow_and_keep())
    assert lease.pool.closed  # closed during the loop's teardown, on the loop:
    assert lease.pool.driver is not None
    assert driver_is_closed(lease.pool.driver)  # gracefully, by driver.close()
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    asyncio.run(one_query())
    gc.collect()
    leaks = _leak_warnings(caplog)
    assert len(leaks) == 1
    assert "_borrow_and_keep" in leaks[0].getMessage()


def test_a_new_loop_with_the_id_of_a_dead_loop_gets_a_new_pool(
    proxied_config: Neo4jConnectionConfig, unraisable: list[Any]
) -> None:
    async def one_task() -> tuple[int, bool, bool, int]:
        await one_query()
        pool = await GlobalNeo4jConnectionPool().get_pool()
        fresh = pool.loop is asyncio.get_running_loop() and not pool.closed
        return id(pool.loop), fresh, pool.stats()["closed"], pool.stats()["borrows"]

    seen: set[int] = set()
    reused = 0
    for _ in range(30):  # one loop per task, as many Celery apps do; CPython reuses ids
        loop_id, fresh, closed, borrows = _run_like_many_celery_apps(one_task)
        reused += loop_id in seen
        seen.add(loop_id)
        assert fresh
        assert not closed
        assert borrows == 1  # its own pool, never a dead loop's
        gc.collect()
    if not reused:
        pytest.skip("this interpreter never reused a dead loop's id")
    asyncio.run(GlobalNeo4jConnectionPool().get_pool_stats())  # sweeps the last one


def test_terminate_releases_the_sockets_of_a_pool_whose_loop_is_gone(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, unraisable: list[Any]
) -> None:
    loop = asyncio.new_event_loop()
    pool = EventLoopConnectionPool(proxied_config, loop=loop)

    async def use(pool: EventLoopConnectionPool) -> None:
        lease = await pool.borrow()
        driver = await lease.get_driver()
        await driver.execute_query("RETURN 1", database_="neo4j")
        await pool.return_connection(lease)

    loop.run_until_complete(use(pool))
    loop.close()
    assert neopool_proxy.active_connections >= 1
    assert pool.terminate() >= 1
    assert pool.closed
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    assert pool.terminate() == 0  # twice is harmless
    del pool, loop
    gc.collect()


def test_a_pool_dropped_with_its_unclosed_loop_raises_nothing_from_finalizers(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, unraisable: list[Any]
) -> None:
    loop = asyncio.new_event_loop()
    pool = EventLoopConnectionPool(proxied_config, loop=loop)
    loop.run_until_complete(pool.get_driver())
    loop.close()
    assert neopool_proxy.active_connections >= 1
    del pool, loop
    gc.collect()  # the teardown sentinel, the driver and its sockets are finalized here
    assert eventually(lambda: neopool_proxy.active_connections == 0)


def test_a_loop_stopped_and_closed_by_hand_after_shutdown_asyncgens_closes_gracefully(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, unraisable: list[Any]
) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(one_query())
    pool = loop.run_until_complete(GlobalNeo4jConnectionPool().get_pool())
    loop.run_until_complete(loop.shutdown_asyncgens())  # the polite manual teardown
    assert pool.closed
    assert pool.driver is not None
    assert driver_is_closed(pool.driver)  # closed on the loop, before it closed
    loop.close()
    assert eventually(lambda: neopool_proxy.active_connections == 0)
