"""EventLoopConnectionPool: leases on one loop's driver, bounded, fair and hard to lose."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

import pytest
from neo4j import AsyncDriver
from neo4j.exceptions import AuthError

from neopool import (
    EventLoopConnectionPool,
    LeaseError,
    Neo4jConnectionConfig,
    NoRunningLoop,
    PoolClosed,
    PooledConnectionManager,
    PoolTimeout,
)
from neopool._release import driver_is_closed, driver_socket_count
from neopool.loop_pool import create_driver
from neopool.testing import BoltTarget
from polling import eventually_async
from user_code import borrowers_in_line


@pytest.fixture
def make_pool(neopool_bolt: BoltTarget) -> Callable[..., EventLoopConnectionPool]:
    def make(**settings: object) -> EventLoopConnectionPool:
        settings.setdefault("pool_max_size", 2)
        settings.setdefault("pool_min_size", 1)
        return EventLoopConnectionPool(neopool_bolt.config(**settings), "test")

    return make


@pytest.fixture
async def pool(
    make_pool: Callable[..., EventLoopConnectionPool],
) -> AsyncIterator[EventLoopConnectionPool]:
    pool = make_pool()
    yield pool
    await pool.close(timeout=0)


async def test_leases_are_bounded_by_pool_max_size(pool: EventLoopConnectionPool) -> None:
    first, second = await pool.borrow(), await pool.borrow()
    with pytest.raises(PoolTimeout):
        await pool.borrow(timeout=0.05)
    assert (pool.in_use, pool.total, pool.available) == (2, 2, 0)
    await pool.return_connection(first)
    await pool.return_connection(second)


async def test_every_lease_shares_the_loops_one_driver(pool: EventLoopConnectionPool) -> None:
    leases = [await pool.borrow() for _ in range(2)]
    drivers = {id(await lease.get_driver()) for lease in leases}
    assert len(drivers) == 1
    assert pool.stats()["drivers_created"] == 1
    for lease in leases:
        await pool.return_connection(lease)


async def test_the_driver_is_warmed_to_pool_min_size_sockets(
    make_pool: Callable[..., EventLoopConnectionPool],
) -> None:
    pool = make_pool(pool_max_size=4, pool_min_size=3)
    lease = await pool.borrow()
    driver = await lease.get_driver()
    assert driver_socket_count(driver) == 3
    assert pool.total == 3  # min_size leases exist before anyone asks
    await pool.return_connection(lease)
    await pool.close()


async def test_waiters_are_served_first_in_first_out(pool: EventLoopConnectionPool) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    served, borrowers = await borrowers_in_line(pool, 6)
    for lease in held:
        await pool.return_connection(lease)
    await asyncio.gather(*borrowers)
    assert served == list(range(6))
    assert (pool.in_use, pool.waiting) == (0, 0)


async def test_a_newcomer_does_not_barge_past_waiters(pool: EventLoopConnectionPool) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    waiter = asyncio.create_task(pool.borrow())
    assert await eventually_async(lambda: pool.waiting == 1)
    await pool.return_connection(held[0])  # handed straight to the waiter
    with pytest.raises(PoolTimeout):
        await pool.borrow(timeout=0.01)
    lease = await waiter
    for each in (lease, held[1]):
        await pool.return_connection(each)


async def test_timeout_names_the_loop_the_limit_and_the_waiters(
    pool: EventLoopConnectionPool,
) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    others = [asyncio.create_task(pool.borrow(timeout=5)) for _ in range(2)]
    assert await eventually_async(lambda: pool.waiting == 2)
    with pytest.raises(PoolTimeout) as raised:
        await pool.borrow(timeout=0.02)
    message = str(raised.value)
    assert "event loop test" in message
    assert "all 2 leases (pool_max_size)" in message
    assert "3 borrower(s) were waiting" in message
    assert (raised.value.max_size, raised.value.waiting) == (2, 3)
    assert pool.stats()["timeouts"] == 1
    assert pool.waiting == 2  # the one that timed out left the queue
    for lease in held:
        await pool.return_connection(lease)
    for lease in await asyncio.gather(*others):
        await pool.return_connection(lease)
    assert (pool.in_use, pool.available, pool.total) == (0, 2, 2)


async def test_cancelling_a_waiter_loses_no_lease(pool: EventLoopConnectionPool) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    waiter = asyncio.create_task(pool.borrow())
    assert await eventually_async(lambda: pool.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.waiting == 0
    for lease in held:
        await pool.return_connection(lease)
    assert (pool.in_use, pool.available) == (0, 2)


async def test_a_lease_handed_over_as_its_waiter_is_cancelled_is_passed_on(
    pool: EventLoopConnectionPool,
) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    doomed = asyncio.create_task(pool.borrow())
    assert await eventually_async(lambda: pool.waiting == 1)
    next_in_line = asyncio.create_task(pool.borrow())
    assert await eventually_async(lambda: pool.waiting == 2)
    await pool.return_connection(held[0])  # resolves doomed's future...
    doomed.cancel()  # ...but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await doomed
    lease = await next_in_line  # the lease went on to the next waiter
    assert pool.in_use == 2
    for each in (lease, held[1]):
        await pool.return_connection(each)
    assert (pool.in_use, pool.available, pool.total) == (0, 2, 2)


async def test_cancelling_a_holder_returns_its_lease(neopool_registry: object) -> None:
    from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory

    entered = asyncio.Event()

    async def holder() -> None:
        async with Neo4jConnectionFactory.borrow_connection():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(holder())
    await entered.wait()
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert pool.in_use == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.in_use == 0


async def test_returning_twice_is_a_clear_error(pool: EventLoopConnectionPool) -> None:
    lease = await pool.borrow()
    await pool.return_connection(lease)
    with pytest.raises(LeaseError, match="already returned; return each lease exactly once"):
        await pool.return_connection(lease)
    assert (pool.in_use, pool.total) == (0, pool.available)


async def test_returning_to_another_pool_is_a_clear_error(
    pool: EventLoopConnectionPool, make_pool: Callable[..., EventLoopConnectionPool]
) -> None:
    other = make_pool()
    lease = await pool.borrow()
    with pytest.raises(LeaseError, match="return it to the pool it came from"):
        await other.return_connection(lease)
    assert lease.in_use  # still out, still returnable where it belongs
    await pool.return_connection(lease)
    await other.close()


async def test_returning_something_else_is_a_clear_error(pool: EventLoopConnectionPool) -> None:
    with pytest.raises(LeaseError, match="not str"):
        await pool.return_connection("connection")  # type: ignore[arg-type]


async def test_a_returned_lease_cannot_be_used(pool: EventLoopConnectionPool) -> None:
    lease = await pool.borrow()
    await pool.return_connection(lease)
    with pytest.raises(LeaseError, match="was returned to its pool"):
        await lease.get_driver()


async def test_a_lease_cannot_be_used_from_another_loop(pool: EventLoopConnectionPool) -> None:
    lease = await pool.borrow()

    async def use_elsewhere() -> AsyncDriver:
        return await lease.get_driver()

    def in_another_loop() -> None:
        asyncio.run(use_elsewhere())

    with pytest.raises(LeaseError, match="sockets belong to the loop that opened them"):
        await asyncio.to_thread(in_another_loop)
    await pool.return_connection(lease)


async def test_closing_wakes_every_waiter_with_pool_closed(
    pool: EventLoopConnectionPool,
) -> None:
    held = [await pool.borrow(), await pool.borrow()]
    waiters = [asyncio.create_task(pool.borrow()) for _ in range(3)]
    assert await eventually_async(lambda: pool.waiting == 3)
    closing = asyncio.create_task(pool.close(timeout=5))
    for waiter in waiters:
        with pytest.raises(PoolClosed):
            await waiter
    with pytest.raises(PoolClosed):
        await pool.borrow()
    driver = pool.driver
    assert driver is not None
    for lease in held:  # close waits for borrowed leases, then closes the driver
        await pool.return_connection(lease)
    await closing
    assert pool.closed
    assert (pool.in_use, pool.waiting) == (0, 0)
    assert driver_is_closed(driver)  # by driver.close(): gracefully, once the leases were back
    assert driver_socket_count(driver) == 0


async def test_a_leak_is_reported_with_where_it_was_borrowed(
    pool: EventLoopConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    lease = await pool.borrow()  # never returned
    with caplog.at_level(logging.WARNING, "neopool"):
        await pool.close(timeout=0)
    assert "was closed while a lease was still in use" in caplog.text
    assert f"test_loop_pool.py:{_line_of('lease = await pool.borrow()  # never returned')}" in (
        caplog.text
    )
    assert lease.borrowed_at in caplog.text
    with pytest.raises(PoolClosed):
        await lease.get_driver()


def _line_of(text: str) -> int:
    with open(__file__) as source:
        for number, line in enumerate(source, 1):
            if text in line and "_line_of" not in line:
                return number
    raise AssertionError(text)


async def test_a_wrong_password_fails_fast_with_the_drivers_auth_error_once(
    neopool_bolt: BoltTarget,
) -> None:
    opened: list[AsyncDriver] = []

    def counting_factory(config: Neo4jConnectionConfig) -> AsyncDriver:
        driver = create_driver(config)
        opened.append(driver)
        return driver

    config = neopool_bolt.config(password="wrong-password")
    pool = EventLoopConnectionPool(config, "auth", driver_factory=counting_factory)
    results = await asyncio.gather(*(pool.borrow() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(result, AuthError) for result in results)
    assert len(opened) == 1  # five borrowers, one attempt: no retry storm
    assert "wrong-password" not in "".join(str(result) for result in results)
    stats = pool.stats()
    assert (stats["drivers_created"], stats["in_use"], stats["borrows"]) == (0, 0, 0)
    with pytest.raises(AuthError):  # a later borrow tries again
        await pool.borrow()
    assert len(opened) == 2
    await pool.close()


def test_borrowing_outside_a_running_loop_is_a_clear_error(
    make_pool: Callable[..., EventLoopConnectionPool],
) -> None:
    pool = make_pool()
    coroutine = pool.borrow()
    with pytest.raises(NoRunningLoop, match="no event loop is running"):
        coroutine.send(None)
    coroutine.close()


async def test_stats_are_exact_after_a_known_sequence(pool: EventLoopConnectionPool) -> None:
    first = await pool.borrow()
    second = await pool.borrow()
    with pytest.raises(PoolTimeout):
        await pool.borrow(timeout=0.01)
    await pool.return_connection(first)
    third = await pool.borrow()
    stats = pool.stats()
    assert {k: stats[k] for k in ("available", "in_use", "total", "max_size", "min_size")} == {
        "available": 0,
        "in_use": 2,
        "total": 2,
        "max_size": 2,
        "min_size": 1,
    }
    assert (stats["borrows"], stats["timeouts"], stats["drivers_created"]) == (3, 1, 1)
    assert stats["waiting"] == 0
    assert stats["wait_ms_total"] >= 10.0
    assert stats["max_wait_ms"] >= 10.0
    assert stats["reuse_ratio"] == pytest.approx(2 / 3, abs=1e-3)
    for lease in (second, third):
        await pool.return_connection(lease)
    assert pool.stats()["available"] == 2


async def test_high_utilisation_and_exhaustion_are_logged_once_per_episode(
    make_pool: Callable[..., EventLoopConnectionPool], caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(pool_max_size=5, pool_min_size=0)
    with caplog.at_level(logging.WARNING, "neopool"):
        for _ in range(2):  # two bursts back to back: one episode, said once
            leases = [await pool.borrow() for _ in range(5)]
            waiter = asyncio.create_task(pool.borrow())
            assert await eventually_async(lambda: pool.waiting == 1)
            for lease in leases:
                await pool.return_connection(lease)
            await pool.return_connection(await waiter)
    assert caplog.text.count("high utilisation on event loop test") == 1
    assert caplog.text.count("pool exhausted on event loop test") == 1
    assert "5 of 5 leases in use" in caplog.text
    await pool.close()


async def test_a_lease_repr_names_its_loop_and_state(pool: EventLoopConnectionPool) -> None:
    lease = await pool.borrow()
    assert repr(lease) == f"<PooledConnectionManager #{lease.lease_id} of loop test, in use>"
    assert isinstance(lease, PooledConnectionManager)
    with pytest.raises(LeaseError, match="already in use"):
        lease.mark_in_use()
    await pool.return_connection(lease)
    with pytest.raises(LeaseError, match="already returned"):
        lease.mark_available()


async def test_mark_available_returns_the_lease_through_its_pool(
    pool: EventLoopConnectionPool,
) -> None:
    """The design note's name for a return: the pool's books and waiters stay right."""
    first, second = await pool.borrow(), await pool.borrow()
    waiter = asyncio.create_task(pool.borrow())
    assert await eventually_async(lambda: pool.waiting == 1)
    first.mark_available()  # no await: it never waits
    third = await waiter  # the waiting borrower got the lease, first in line
    assert third.in_use
    assert (pool.in_use, pool.waiting) == (2, 0)
    second.mark_available()
    assert not second.in_use
    with pytest.raises(LeaseError, match="already returned"):
        second.mark_available()
    third.mark_available()
    assert (pool.in_use, pool.available) == (0, pool.total)


async def test_mark_in_use_refuses_and_leaves_the_pool_as_it_was(
    pool: EventLoopConnectionPool,
) -> None:
    lease = await pool.borrow()
    await pool.return_connection(lease)
    before = (pool.in_use, pool.available, pool.total)
    with pytest.raises(LeaseError, match="only by a borrow") as refused:
        lease.mark_in_use()  # once, this took the lease past the pool's books
    assert "borrow_connection()" in str(refused.value)
    assert not lease.in_use
    assert (pool.in_use, pool.available, pool.total) == before
    with pytest.raises(LeaseError, match="was returned to its pool"):
        await lease.get_driver()
    again = await pool.borrow()  # the pool lends it as before
    await pool.return_connection(again)
    assert pool.in_use == 0


async def test_a_lease_is_returned_only_on_its_own_loop(pool: EventLoopConnectionPool) -> None:
    lease = await pool.borrow()
    error: list[BaseException] = []

    def elsewhere() -> None:
        try:
            lease.mark_available()
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert isinstance(error[0], NoRunningLoop)
    assert lease.in_use
    lease.mark_available()


async def test_a_borrow_that_needs_no_wait_still_records_where_it_was_borrowed(
    neopool_registry: object, caplog: pytest.LogCaptureFixture
) -> None:
    from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory

    async with Neo4jConnectionFactory.borrow_connection():  # opens the driver (it waits)
        pass
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:  # a free lease: no wait
        assert borrowed.connection is not None
        site = borrowed.connection.borrowed_at
    line = _line_of("as borrowed:  # a free lease: no wait")
    this_test = test_a_borrow_that_needs_no_wait_still_records_where_it_was_borrowed.__name__
    assert site.endswith(f"test_loop_pool.py:{line} in {this_test}")
    leaked = Neo4jConnectionFactory.borrow_connection()
    await leaked.__aenter__()  # never left
    pool = await GlobalNeo4jConnectionPool().get_pool()
    with caplog.at_level(logging.WARNING, "neopool"):
        await pool.close(timeout=0)
    assert f"test_loop_pool.py:{_line_of('await leaked.__aenter__()  # never left')}" in caplog.text
    await leaked.__aexit__(None, None, None)  # its holder ends too: nothing is left to collect
