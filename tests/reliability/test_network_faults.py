"""Network faults between pool and server: bounded, clear errors, then the pool heals itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from neo4j import AsyncDriver
from neo4j.exceptions import ServiceUnavailable, SessionExpired

from neopool import (
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
)
from neopool._release import driver_socket_count
from neopool.loop_pool import PoolState
from neopool.testing import BoltTarget, TcpProxy
from polling import eventually_async

pytestmark = pytest.mark.timeout(90)

CONNECTIVITY = (ServiceUnavailable, SessionExpired)
#: Far beyond every timeout configured below: reaching it means something hung.
HANG = 30.0


@pytest.fixture
def faulty(configure: Callable[..., Neo4jConnectionConfig], neopool_proxy: TcpProxy) -> TcpProxy:
    """The registry configured to reach the server through the proxy, with short timeouts."""
    configure(
        uri=neopool_proxy.uri(),
        pool_max_size=4,
        pool_min_size=1,
        connection_timeout=1.0,
        connection_acquisition_timeout=1.0,
        max_transaction_retry_time=0.0,
        close_timeout=1.0,
    )
    return neopool_proxy


async def _run(query: str = "RETURN 1 AS one") -> int:
    """One borrow, one auto-commit query (no retries), one return."""
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        async with driver.session(database="neo4j") as session:
            record = await (await session.run(query)).single()
            assert record is not None
            return int(record[0])


async def _pool() -> EventLoopConnectionPool:
    return await GlobalNeo4jConnectionPool().get_pool()


def _assert_consistent(pool: EventLoopConnectionPool) -> None:
    assert pool.in_use == 0
    assert pool.available + pool.in_use == pool.total <= pool.max_size
    assert pool.waiting == 0


async def test_cutting_every_connection_mid_query_fails_clearly_then_the_next_borrow_works(
    faulty: TcpProxy,
) -> None:
    assert await _run() == 1
    faulty.set_latency(400)  # keep the next query on the wire when the cut lands
    sent = faulty.bytes_up
    query = asyncio.ensure_future(_run("RETURN 2"))
    # The query reached the server; its answer is 200 ms from the driver.
    assert await eventually_async(lambda: faulty.bytes_up > sent, HANG)
    assert faulty.cut_all() >= 1
    with pytest.raises(CONNECTIVITY):
        await asyncio.wait_for(query, HANG)

    faulty.set_latency(0)
    assert await asyncio.wait_for(_run("RETURN 3"), HANG) == 3
    _assert_consistent(await _pool())


async def test_a_managed_transaction_survives_a_cut_by_retrying(
    neopool_bolt: BoltTarget, faulty: TcpProxy
) -> None:
    GlobalNeo4jConnectionPool.set_config(
        neopool_bolt.config(uri=faulty.uri(), max_transaction_retry_time=15.0)
    )
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("RETURN 1", database_="neo4j")
        opened = faulty.connections_opened
        assert faulty.cut_all() >= 1
        records, _, _ = await asyncio.wait_for(
            driver.execute_query("RETURN 7 AS seven", database_="neo4j"), HANG
        )
    assert records[0]["seven"] == 7
    assert faulty.connections_opened > opened  # it reconnected through the proxy
    _assert_consistent(await _pool())


async def test_a_blackhole_gives_bounded_clear_errors_and_the_pool_heals_afterwards(
    faulty: TcpProxy,
) -> None:
    assert await _run() == 1
    faulty.set_blackhole(True)

    # A query on a socket that stops answering: bounded by the caller's own deadline,
    # after which the pool checks its driver before lending it again.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(_run(), 2.0)
    # The next borrows fail with the driver's error, within the connection timeouts.
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(CONNECTIVITY):
            await asyncio.wait_for(_run(), HANG)
        assert time.monotonic() - started < HANG
    _assert_consistent(await _pool())

    faulty.set_blackhole(False)
    assert await asyncio.wait_for(_run("RETURN 5"), HANG) == 5
    _assert_consistent(await _pool())


async def test_a_blackhole_cannot_hang_the_first_borrow_of_a_loop(faulty: TcpProxy) -> None:
    faulty.set_blackhole(True)
    with pytest.raises(CONNECTIVITY):
        await asyncio.wait_for(_run(), HANG)
    pool = await _pool()
    _assert_consistent(pool)
    assert pool.driver is None  # nothing half-open was kept

    faulty.set_blackhole(False)
    assert await asyncio.wait_for(_run(), HANG) == 1


async def test_a_blackhole_cannot_hang_close(faulty: TcpProxy) -> None:
    pool = await _pool()
    assert await _run() == 1
    lease = await pool.borrow()  # and one never comes back
    driver = pool.driver
    assert driver is not None
    faulty.set_blackhole(True)
    await asyncio.wait_for(pool.close(timeout=0.5), HANG)
    assert pool.state is PoolState.CLOSED
    assert lease.in_use  # reported as a leak, not waited for forever
    # Its sockets are released all the same (aborted: the server would never answer a goodbye).
    assert await eventually_async(lambda: driver_socket_count(driver) == 0)


async def test_200ms_latency_slows_queries_but_every_borrower_succeeds(faulty: TcpProxy) -> None:
    faulty.set_latency(200)
    results = await asyncio.wait_for(
        asyncio.gather(*(_run(f"RETURN {i}") for i in range(12))), HANG
    )
    assert results == list(range(12))
    pool = await _pool()
    _assert_consistent(pool)
    stats = pool.stats()
    assert stats["borrows"] == 12
    assert stats["total"] <= stats["max_size"] == 4
    assert stats["max_wait_ms"] > 0  # 12 borrowers, 4 leases: some waited, none overflowed


async def test_a_driver_that_became_unusable_is_replaced_on_the_next_borrow(
    faulty: TcpProxy,
) -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        broken: AsyncDriver = await borrowed.get_driver()
        await broken.close()  # someone closed the shared driver behind the pool's back

    assert await asyncio.wait_for(_run(), HANG) == 1
    pool = await _pool()
    assert pool.driver is not broken
    assert pool.stats()["drivers_created"] == 2
    _assert_consistent(pool)


async def test_a_connectivity_error_makes_the_pool_check_its_driver_once(
    faulty: TcpProxy,
) -> None:
    assert await _run() == 1
    pool = await _pool()
    driver = pool.driver
    faulty.cut_all()
    with pytest.raises(CONNECTIVITY):
        await _run()
    # The server is fine, only the sockets died: the check passes and the driver stays.
    assert await _run() == 1
    assert pool.driver is driver
    assert pool.stats()["drivers_created"] == 1
