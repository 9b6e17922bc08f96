"""The pool's lifecycle as a state machine, on a fake driver: each test states one rule.

A pool moves OPEN -> CLOSING -> CLOSED. These tests drive every way of getting
there (a close that drains, times out, fails or is cancelled; terminate from a
dead loop; the registry's dispatcher) and the borrowing rules around it
(first-in first-out waiters, timeouts, cancellation, leases collected unreturned,
a replaced driver), on :class:`neopool.testing.FakeDriverFactory` drivers whose
``verify_connectivity`` and ``close`` hang or fail on command (asyncio events, never
sleeps). No server is needed; each test takes milliseconds. The drivers hold real
local sockets (``sockets=True``), so "released" is seen, not assumed: however a
pool ends, every socket its drivers opened is closed or released.

After every step the books balance: ``available + in_use == total <= max_size``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from neo4j.exceptions import ServiceUnavailable

import neopool
from neopool import (
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    LeaseError,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    PoolClosed,
    PooledConnectionManager,
    PoolTimeout,
    runner,
)
from neopool._release import driver_socket_count
from neopool.loop_pool import PoolState
from neopool.registry import LoopReach
from neopool.testing import FakeDriver, FakeDriverFactory, reset_registry
from polling import eventually, eventually_async
from user_code import WorkerThread, borrowers_in_line

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")

#: A config that needs no server: the fake driver never connects.
BASE: dict[str, Any] = {
    "uri": "bolt://127.0.0.1:7687",
    "password": "x",
    "pool_max_size": 2,
    "pool_min_size": 1,
    "borrow_timeout": 5.0,
    "close_timeout": 0.05,
    "connection_timeout": 0.02,
    "connection_acquisition_timeout": 0.02,
}
#: The deadline tests give a close (the config's ``close_timeout`` too).
DEADLINE = 0.05
#: Scheduling slack allowed on top of a deadline (the machine may be busy).
SLACK = 0.5
#: Outer limit for anything awaited in a test: a bug fails the test instead of hanging it.
LIMIT = 5.0


def make_config(**settings: Any) -> Neo4jConnectionConfig:
    return Neo4jConnectionConfig(**{**BASE, **settings})


def books(pool: EventLoopConnectionPool) -> None:
    """The pool's counts agree: ``available + in_use == total <= max_size``."""
    assert pool.available + pool.in_use == pool.total <= pool.max_size, repr(pool)
    assert pool.available >= 0
    assert pool.in_use >= 0


async def settle() -> None:
    """Let every ready callback run (a hand-off takes a few loop iterations)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def within(awaitable: Awaitable[T], limit: float = LIMIT) -> T:
    return await asyncio.wait_for(awaitable, limit)


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    """The result and how many seconds it took (bounded by :data:`LIMIT`)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await within(awaitable)
    return result, loop.time() - started


async def until(condition: Callable[[], object]) -> None:
    """Let the loop run until ``condition`` holds (the suite's polling helper, bounded)."""
    assert await eventually_async(condition, timeout=LIMIT), "the condition never held"


@pytest.fixture(scope="module", autouse=True)
def _only_new_objects_are_collected() -> Iterator[None]:
    """Freeze what was imported, so each ``gc.collect()`` here takes microseconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def factory() -> FakeDriverFactory:
    """Fake drivers holding real local sockets, so a release can be seen."""
    return FakeDriverFactory(sockets=True)


@pytest.fixture
async def make_pool(
    factory: FakeDriverFactory, unraisable: list[Any]
) -> AsyncIterator[Callable[..., EventLoopConnectionPool]]:
    made: list[EventLoopConnectionPool] = []

    def make(**settings: Any) -> EventLoopConnectionPool:
        pool = EventLoopConnectionPool(make_config(**settings), "test", driver_factory=factory)
        made.append(pool)
        return pool

    yield make
    factory.unblock_all()
    for pool in made:
        await within(pool.close(timeout=0))
        books(pool)
        assert pool.state is PoolState.CLOSED
    for driver in factory.drivers:
        assert driver.wrong_loop_calls == []


@pytest.fixture
def fake_registry(factory: FakeDriverFactory) -> Iterator[Callable[..., GlobalNeo4jConnectionPool]]:
    """Configure the global registry with ``make_config(**settings)`` and the fake drivers.

    The registry is emptied before, and emptied and back to the default driver
    factory after the test.
    """
    reset_registry()

    def configure(**settings: Any) -> GlobalNeo4jConnectionPool:
        GlobalNeo4jConnectionPool.set_config(make_config(**settings))
        GlobalNeo4jConnectionPool.set_driver_factory(factory)
        return GlobalNeo4jConnectionPool()

    yield configure
    GlobalNeo4jConnectionPool.set_driver_factory()
    reset_registry()


@pytest.fixture
async def pool(make_pool: Callable[..., EventLoopConnectionPool]) -> EventLoopConnectionPool:
    return make_pool()


def ended(driver: FakeDriver) -> bool:
    """A driver is over when every socket it opened is closed or released."""
    return driver.open_sockets() == 0


async def fill(pool: EventLoopConnectionPool) -> list[PooledConnectionManager]:
    """Borrow every lease the pool has."""
    leases = [await within(pool.borrow()) for _ in range(pool.max_size)]
    books(pool)
    return leases


async def give_back(pool: EventLoopConnectionPool, leases: list[PooledConnectionManager]) -> None:
    for lease in leases:
        await pool.return_connection(lease)
        books(pool)


@pytest.fixture
async def idle_driver(pool: EventLoopConnectionPool, factory: FakeDriverFactory) -> FakeDriver:
    """The pool's one driver, opened by a borrow whose lease is back: the pool is open and idle."""
    await give_back(pool, [await within(pool.borrow())])
    (driver,) = factory.drivers
    return driver


async def close_by_the_deadline(pool: EventLoopConnectionPool) -> None:
    """``pool.close(timeout=DEADLINE)`` returns within it (and some slack): the pool is CLOSED."""
    _, took = await timed(pool.close(timeout=DEADLINE))
    assert took < DEADLINE + SLACK
    assert pool.state is PoolState.CLOSED


# -- a close ends CLOSED, within its timeout, whatever the driver does ----------------


async def test_a_close_with_no_lease_out_closes_the_driver_and_ends_closed(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    assert pool.state is PoolState.OPEN
    await within(pool.close())
    assert pool.state is PoolState.CLOSED
    assert idle_driver.closes_completed == 1
    assert ended(idle_driver)
    books(pool)


async def test_a_close_whose_driver_close_hangs_ends_in_terminate_within_its_timeout(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    idle_driver.close_hangs = True
    await close_by_the_deadline(pool)
    assert idle_driver.close_calls == 1
    assert idle_driver.closes_completed == 0
    assert ended(idle_driver), "a close that timed out must release the sockets"
    books(pool)


async def test_a_close_whose_driver_close_fails_ends_in_terminate(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    idle_driver.close_error = OSError("connection reset")
    await within(pool.close())  # the failure is the pool's to handle, not the caller's
    assert pool.state is PoolState.CLOSED
    assert ended(idle_driver)


async def test_a_close_of_zero_seconds_ends_in_terminate_at_once(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    lease = await within(pool.borrow())
    factory.drivers[0].close_hangs = True
    _, took = await timed(pool.close(timeout=0))
    assert took < SLACK
    assert pool.state is PoolState.CLOSED
    assert ended(factory.drivers[0])
    await pool.return_connection(lease)
    books(pool)


async def test_a_close_cancelled_half_way_ends_in_terminate(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    idle_driver.close_hangs = True
    closing = pool.start_close(timeout=30)
    assert closing is not None
    await within(idle_driver.close_started.wait())
    assert pool.state is PoolState.CLOSING
    closing.cancel()  # as a loop's teardown cancels every task
    with pytest.raises(asyncio.CancelledError):
        await within(closing)
    assert pool.state is PoolState.CLOSED
    assert ended(idle_driver)
    await within(pool.close())  # closing it again returns quietly: nobody cancelled this caller
    books(pool)


async def test_cancelling_the_caller_of_close_does_not_stop_the_close(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    idle_driver.close_hangs = True
    caller = asyncio.ensure_future(pool.close(timeout=30))
    await within(idle_driver.close_started.wait())
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(caller)
    assert pool.state is PoolState.CLOSING  # the close goes on, shielded
    idle_driver.unblock()
    closing = pool.start_close()  # the close under way, not a new one
    assert closing is not None
    await within(closing)
    assert pool.state is PoolState.CLOSED
    assert idle_driver.closes_completed == 1


async def test_close_waits_for_borrowed_leases_before_closing_the_driver(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    lease = await within(pool.borrow())
    (driver,) = factory.drivers
    closing = asyncio.ensure_future(pool.close(timeout=30))
    await settle()
    assert pool.state is PoolState.CLOSING
    assert driver.close_calls == 0, "the driver closed under a borrower still using it"
    await pool.return_connection(lease)
    books(pool)
    await within(closing)
    assert pool.state is PoolState.CLOSED
    assert driver.closes_completed == 1
    assert (pool.in_use, pool.total) == (0, pool.available)


async def test_close_stops_waiting_for_leases_at_half_its_timeout_and_reports_them(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    lease = await pool.borrow()
    _, took = await timed(pool.close(timeout=DEADLINE))
    assert DEADLINE / 2 <= took < DEADLINE + SLACK
    assert pool.state is PoolState.CLOSED
    assert factory.drivers[0].closes_completed == 1
    assert "was closed while a lease was still in use" in caplog.text
    assert "test_pool_state_machine.py" in caplog.text  # it names where it was borrowed
    await pool.return_connection(lease)
    books(pool)


async def test_a_lease_returned_after_the_pool_closed_is_taken_back_quietly(
    pool: EventLoopConnectionPool,
) -> None:
    leases = await fill(pool)
    await within(pool.close(timeout=0))
    assert pool.in_use == 2
    await give_back(pool, leases)
    assert pool.in_use == 0
    with pytest.raises(LeaseError, match="already returned"):
        await pool.return_connection(leases[0])
    books(pool)


async def test_closing_twice_and_terminating_after_a_close_are_harmless(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    first = asyncio.ensure_future(pool.close())
    second = asyncio.ensure_future(pool.close())
    await within(asyncio.gather(first, second))
    assert idle_driver.close_calls == 1, "two closes must share one"
    await within(pool.close())
    again = pool.start_close()
    assert again is None or again.done(), "a closed pool has nothing left to close"
    assert pool.terminate() == 0
    assert pool.terminate() == 0
    assert pool.state is PoolState.CLOSED
    books(pool)


async def test_terminating_twice_is_harmless_and_a_close_after_it_does_nothing(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    assert pool.terminate() == 1  # the driver's one socket, released without I/O
    assert idle_driver.open_sockets() == 0
    assert pool.terminate() == 0
    await within(pool.close())
    assert pool.state is PoolState.CLOSED
    assert idle_driver.close_calls == 0  # terminate sends nothing, and nothing follows


async def test_a_terminate_during_a_close_leaves_the_pool_closed(
    pool: EventLoopConnectionPool, idle_driver: FakeDriver
) -> None:
    idle_driver.close_hangs = True
    closing = asyncio.ensure_future(pool.close(timeout=DEADLINE))
    await within(idle_driver.close_started.wait())
    pool.terminate()
    assert pool.state is PoolState.CLOSED
    await within(closing)
    assert pool.state is PoolState.CLOSED
    books(pool)


async def test_borrowing_from_a_closing_or_closed_pool_raises_pool_closed(
    pool: EventLoopConnectionPool,
) -> None:
    lease = await within(pool.borrow())
    closing = asyncio.ensure_future(pool.close(timeout=5))
    await settle()
    assert pool.state is PoolState.CLOSING
    with pytest.raises(PoolClosed):
        await within(pool.borrow())
    await pool.return_connection(lease)
    await within(closing)
    with pytest.raises(PoolClosed):
        await within(pool.borrow())
    with pytest.raises(PoolClosed):
        await within(pool.get_driver())
    books(pool)


# -- waiters -----------------------------------------------------------------------------


async def test_every_waiter_gets_pool_closed_when_the_pool_closes(
    pool: EventLoopConnectionPool,
) -> None:
    held = await fill(pool)
    waiters = [asyncio.ensure_future(pool.borrow()) for _ in range(4)]
    await until(lambda: pool.waiting == 4)
    closing = asyncio.ensure_future(pool.close(timeout=5))
    results = await within(asyncio.gather(*waiters, return_exceptions=True))
    assert [type(r) for r in results] == [PoolClosed] * 4
    assert pool.waiting == 0
    books(pool)
    await give_back(pool, held)
    await within(closing)
    assert (pool.state, pool.in_use) == (PoolState.CLOSED, 0)


async def begin_opening(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory, borrowers: int = 1
) -> tuple[list[asyncio.Task[PooledConnectionManager]], FakeDriver]:
    """Start ``borrowers`` borrows at once; return them and their driver once it is being checked.

    The borrows wait for the check, which hangs if the factory was told so.
    """
    borrows = [asyncio.create_task(pool.borrow()) for _ in range(borrowers)]
    await until(lambda: bool(factory.drivers) and factory.drivers[0].verify_started.is_set())
    (driver,) = factory.drivers
    return borrows, driver


async def test_a_borrower_whose_driver_is_still_opening_gets_pool_closed_when_the_pool_closes(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    factory.verify_hangs = True
    (borrower,), driver = await begin_opening(pool, factory)
    await within(pool.close(timeout=DEADLINE))
    with pytest.raises(PoolClosed, match="closed while opening its driver"):
        await within(borrower)
    assert pool.state is PoolState.CLOSED
    assert pool.driver is None
    assert ended(driver), "the driver being opened was neither closed nor released"
    books(pool)


async def test_a_driver_being_opened_whose_close_hangs_when_the_pool_closes_is_released(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    factory.verify_hangs = factory.close_hangs = True
    (borrower,), driver = await begin_opening(pool, factory)
    await close_by_the_deadline(pool)
    with pytest.raises(PoolClosed):
        await within(borrower)
    assert driver.closes_completed == 0
    assert ended(driver), "a close cut short must leave the driver to terminate"


async def test_cancelling_one_borrower_while_the_driver_opens_does_not_stop_the_others(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    factory.verify_hangs = True
    (impatient, patient), driver = await begin_opening(pool, factory, borrowers=2)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(impatient)
    driver.unblock()
    lease = await within(patient)
    assert pool.driver is driver
    assert len(factory.drivers) == 1
    await give_back(pool, [lease])


async def test_many_concurrent_borrowers_open_one_driver(
    make_pool: Callable[..., EventLoopConnectionPool], factory: FakeDriverFactory
) -> None:
    pool = make_pool(pool_max_size=5, pool_min_size=3)
    leases = await within(asyncio.gather(*(pool.borrow() for _ in range(5))))
    assert len(factory.drivers) == 1
    assert factory.drivers[0].verify_calls == 3  # warmed to pool_min_size, side by side
    assert driver_socket_count(factory.drivers[0]) == 3
    books(pool)
    await give_back(pool, list(leases))


async def test_a_driver_that_fails_to_open_fails_the_borrow_is_closed_and_the_next_borrow_retries(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    factory.verify_error = ServiceUnavailable("no server")
    with pytest.raises(ServiceUnavailable):
        await within(pool.borrow())
    assert factory.drivers[0].closes_completed == 1
    assert pool.driver is None
    books(pool)
    factory.verify_error = None
    lease = await within(pool.borrow())
    assert pool.driver is factory.drivers[1]
    await give_back(pool, [lease])


async def test_a_driver_open_that_hangs_fails_the_borrow_within_the_connection_timeouts(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    factory.verify_hangs = True  # connection_timeout + connection_acquisition_timeout
    with pytest.raises(asyncio.TimeoutError):
        await timed(pool.borrow())
    assert factory.drivers[0].closes_completed == 1
    assert (pool.state, pool.in_use, pool.waiting) == (PoolState.OPEN, 0, 0)
    books(pool)


async def test_waiters_are_served_first_in_first_out(pool: EventLoopConnectionPool) -> None:
    held = await fill(pool)
    served, borrowers = await borrowers_in_line(pool, 6)
    books(pool)
    await give_back(pool, held)
    await within(asyncio.gather(*borrowers))
    assert served == list(range(6))
    assert (pool.in_use, pool.waiting) == (0, 0)
    books(pool)


async def test_a_newcomer_does_not_barge_past_a_waiter(pool: EventLoopConnectionPool) -> None:
    held = await fill(pool)
    waiter = asyncio.ensure_future(pool.borrow())
    await until(lambda: pool.waiting == 1)
    await pool.return_connection(held[0])  # handed straight to the waiter
    books(pool)
    with pytest.raises(PoolTimeout):
        await within(pool.borrow(timeout=0.01))
    lease = await within(waiter)
    await give_back(pool, [lease, held[1]])


async def test_a_lease_handed_to_a_waiter_names_the_waiters_borrow_not_the_last_one(
    pool: EventLoopConnectionPool,
) -> None:
    held = await fill(pool)
    first_site = held[0].borrowed_at

    async def waiting_borrower() -> PooledConnectionManager:
        return await pool.borrow()

    waiter = asyncio.ensure_future(waiting_borrower())
    await until(lambda: pool.waiting == 1)
    await pool.return_connection(held[0])  # handed to the waiter, which has not woken yet
    assert held[0].borrowed_at != first_site  # whoever returned it is not its borrower now
    lease = await within(waiter)
    assert lease.borrowed_at.endswith("in waiting_borrower")
    await give_back(pool, [lease, held[1]])


async def test_a_waiter_times_out_with_pool_timeout_and_leaves_the_queue(
    pool: EventLoopConnectionPool,
) -> None:
    held = await fill(pool)
    patient = asyncio.ensure_future(pool.borrow(timeout=30))
    await until(lambda: pool.waiting == 1)
    with pytest.raises(PoolTimeout) as raised:
        await timed(pool.borrow(timeout=0.02))
    assert (raised.value.max_size, raised.value.waiting) == (2, 2)
    assert pool.waiting == 1
    assert pool.stats()["timeouts"] == 1
    books(pool)
    await pool.return_connection(held[0])
    await give_back(pool, [await within(patient), held[1]])


async def test_a_timeout_of_zero_fails_at_once_when_no_lease_is_free(
    pool: EventLoopConnectionPool,
) -> None:
    held = await fill(pool)
    with pytest.raises(PoolTimeout):
        await timed(pool.borrow(timeout=0))
    assert pool.waiting == 0
    await give_back(pool, held)
    await give_back(pool, [await within(pool.borrow(timeout=0))])  # a free lease needs no wait


async def test_a_bad_timeout_is_rejected_before_anything_changes(
    pool: EventLoopConnectionPool,
) -> None:
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="timeout"):
            await within(pool.borrow(timeout=bad))
    assert (pool.waiting, pool.in_use) == (0, 0)
    books(pool)


async def test_cancelling_a_waiter_loses_no_lease(pool: EventLoopConnectionPool) -> None:
    held = await fill(pool)
    waiter = asyncio.ensure_future(pool.borrow())
    await until(lambda: pool.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(waiter)
    assert pool.waiting == 0
    books(pool)
    await give_back(pool, held)
    assert (pool.in_use, pool.available) == (0, 2)


async def test_a_lease_handed_to_a_waiter_cancelled_before_it_wakes_goes_to_the_next_waiter(
    pool: EventLoopConnectionPool,
) -> None:
    held = await fill(pool)
    doomed = asyncio.ensure_future(pool.borrow())
    await until(lambda: pool.waiting == 1)
    next_in_line = asyncio.ensure_future(pool.borrow())
    await until(lambda: pool.waiting == 2)
    await pool.return_connection(held[0])  # resolves doomed's future...
    doomed.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await within(doomed)
    lease = await within(next_in_line)
    assert pool.in_use == 2
    books(pool)
    await give_back(pool, [lease, held[1]])
    assert (pool.in_use, pool.available, pool.total) == (0, 2, 2)


# -- leases nobody returned --------------------------------------------------------------


class Holder:
    """Keeps a lease, in a reference cycle: only the garbage collector frees it."""

    def __init__(self, lease: PooledConnectionManager) -> None:
        self.lease = lease
        self.me = self


async def borrow_and_drop(pool: EventLoopConnectionPool) -> None:
    Holder(await pool.borrow())  # dropped unreturned, freed at the next collection


async def test_a_lease_whose_holder_is_collected_comes_back(
    pool: EventLoopConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    for _ in range(pool.max_size):
        await within(borrow_and_drop(pool))
    gc.collect()
    await until(lambda: pool.in_use == 0)
    books(pool)
    await give_back(pool, await fill(pool))  # the capacity is all back
    assert "borrow_and_drop" in caplog.text  # named where it was borrowed


async def test_a_lease_whose_holder_is_collected_goes_to_the_first_waiter(
    pool: EventLoopConnectionPool,
) -> None:
    kept = await within(pool.borrow())
    gc.disable()  # the lease comes back at the collection below, not before
    try:
        await within(borrow_and_drop(pool))
        waiter = asyncio.ensure_future(pool.borrow(timeout=5))
        await until(lambda: pool.waiting == 1)
        gc.collect()
    finally:
        gc.enable()
    lease = await within(waiter)
    books(pool)
    assert pool.in_use == 2
    await give_back(pool, [lease, kept])


async def test_a_lease_collected_after_its_pool_closed_is_taken_back(
    pool: EventLoopConnectionPool,
) -> None:
    await within(borrow_and_drop(pool))
    await within(pool.close(timeout=0))
    gc.collect()
    await until(lambda: pool.in_use == 0)
    assert pool.state is PoolState.CLOSED
    books(pool)


# -- a driver replaced after a connectivity error ------------------------------------------


async def break_the_driver(pool: EventLoopConnectionPool, driver: FakeDriver) -> None:
    """A borrower ends with a connectivity error, and the driver now fails its check."""
    driver.verify_error = ServiceUnavailable("the network went away")
    lease = await within(pool.borrow())
    await pool.return_connection(lease, ServiceUnavailable("the network went away"))


async def test_after_a_connectivity_error_a_driver_that_passes_its_check_is_kept(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    lease = await within(pool.borrow())
    await pool.return_connection(lease, ServiceUnavailable("a blip"))
    checks = factory.drivers[0].verify_calls
    await give_back(pool, [await within(pool.borrow())])
    assert factory.drivers[0].verify_calls == checks + 1  # checked once, then kept
    assert len(factory.drivers) == 1
    assert pool.driver is factory.drivers[0]


async def test_a_driver_that_fails_its_check_is_replaced_and_closed_once_its_leases_are_back(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    long_held = await within(pool.borrow(timeout=5))  # the old driver's time: out till later
    old = factory.drivers[0]
    await break_the_driver(pool, old)
    fresh = await within(pool.borrow())
    assert await fresh.get_driver() is factory.drivers[1]
    assert pool.driver is factory.drivers[1]
    await settle()
    assert old.close_calls == 0, "the old driver closed under a lease of its time"
    await pool.return_connection(long_held)
    await within(old.close_started.wait())
    await until(lambda: old.closes_completed == 1)
    books(pool)
    await give_back(pool, [fresh])
    assert factory.drivers[1].close_calls == 0


async def test_a_replaced_driver_is_closed_after_close_timeout_even_with_a_lease_still_out(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    long_held = await within(pool.borrow())
    old = factory.drivers[0]
    await break_the_driver(pool, old)
    fresh = await within(pool.borrow())
    await within(old.close_started.wait(), limit=DEADLINE + SLACK)  # close_timeout
    await until(lambda: old.closes_completed == 1)
    assert pool.in_use == 2
    books(pool)
    await give_back(pool, [fresh, long_held])


async def test_a_driver_whose_check_hangs_is_replaced_after_connection_timeout(
    pool: EventLoopConnectionPool, factory: FakeDriverFactory
) -> None:
    lease = await within(pool.borrow())
    await pool.return_connection(lease, ServiceUnavailable("a blip"))
    factory.drivers[0].verify_hangs = True
    fresh, took = await timed(pool.borrow())
    assert took < DEADLINE + SLACK
    assert pool.driver is factory.drivers[1]
    await give_back(pool, [fresh])
    await until(lambda: factory.drivers[0].closes_completed == 1)


async def test_closing_the_pool_ends_a_replaced_driver_still_waiting_for_its_leases(
    make_pool: Callable[..., EventLoopConnectionPool],
    factory: FakeDriverFactory,
) -> None:
    pool = make_pool(close_timeout=30)  # the replaced driver would wait long for its lease
    long_held = await within(pool.borrow())
    old = factory.drivers[0]
    await break_the_driver(pool, old)
    fresh = await within(pool.borrow())
    await pool.return_connection(fresh)
    await close_by_the_deadline(pool)
    assert all(ended(driver) for driver in factory.drivers)
    await pool.return_connection(long_held)
    books(pool)


async def test_closing_the_pool_ends_a_replaced_driver_whose_close_is_under_way(
    make_pool: Callable[..., EventLoopConnectionPool],
    factory: FakeDriverFactory,
) -> None:
    pool = make_pool(close_timeout=30)
    lease = await within(pool.borrow())
    old = factory.drivers[0]
    old.close_hangs = True
    await break_the_driver(pool, old)
    await pool.return_connection(lease)  # the leases of its time are back: it closes now
    fresh = await within(pool.borrow())
    await within(old.close_started.wait())  # and hangs there
    await pool.return_connection(fresh)
    await close_by_the_deadline(pool)
    assert ended(factory.drivers[1])
    assert ended(old), "a replaced driver whose close was cut short was left open"


# -- loops that can never run again ------------------------------------------------------------


def test_terminate_from_another_thread_after_the_loop_closed_ends_the_pool(
    factory: FakeDriverFactory, unraisable: list[Any]
) -> None:
    loop = asyncio.new_event_loop()
    pool = EventLoopConnectionPool(make_config(pool_max_size=1), "dead", driver_factory=factory)

    async def borrow_and_wait() -> asyncio.Future[PooledConnectionManager]:
        await borrow_and_drop(pool)  # collected later, after the loop closed
        waiter = asyncio.ensure_future(pool.borrow(timeout=30))
        await until(lambda: pool.waiting == 1)
        return waiter

    gc.disable()
    try:
        waiter = loop.run_until_complete(borrow_and_wait())
    finally:
        gc.enable()
    loop.close()  # without closing the pool: it can never run again
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(pool.terminate()))
    thread.start()
    thread.join(LIMIT)
    assert result == [1]  # the driver's one socket, released without I/O
    assert pool.state is PoolState.CLOSED
    assert pool.waiting == 0
    assert ended(factory.drivers[0])
    assert pool.terminate() == 0
    del waiter
    gc.collect()  # the unreturned lease's callback runs with the loop closed: no exception
    assert pool.in_use == 0
    books(pool)


def test_an_open_left_on_a_dead_loop_is_finished_by_the_collector_without_another_loop(
    factory: FakeDriverFactory, unraisable: list[Any]
) -> None:
    """A thread stopped its loop while the driver was opening; another loop runs the collection."""
    factory.verify_hangs = True
    dead = asyncio.new_event_loop()
    pool = EventLoopConnectionPool(make_config(), "dead", driver_factory=factory, loop=dead)
    dead.run_until_complete(begin_opening(pool, factory))  # and the loop never runs again
    assert pool.terminate() == 1  # the socket of the open under way
    assert ended(factory.drivers[0])
    calls_from_other_loops = factory.drivers[0].wrong_loop_calls
    del pool, dead
    factory.drivers.clear()

    async def collect_here() -> None:
        gc.collect()  # the dead loop's pending open is finalized while this loop runs
        await settle()

    asyncio.run(collect_here())
    assert calls_from_other_loops == [], "a dead loop's driver was driven from another loop"
    # (and ``unraisable`` fails the test if the open's coroutine raised as it was finalized)


def test_the_registry_terminates_the_pool_of_a_closed_loop_at_its_next_sweep(
    factory: FakeDriverFactory,
    unraisable: list[Any],
    fake_registry: Callable[..., GlobalNeo4jConnectionPool],
) -> None:
    registry = fake_registry()
    loop = asyncio.new_event_loop()
    lease = loop.run_until_complete(registry.borrow_connection())
    pool = lease.pool
    loop.run_until_complete(registry.return_connection(lease))
    assert registry.loop_reach(pool) is LoopReach.IDLE
    loop.close()
    assert registry.loop_reach(pool) is LoopReach.CLOSED
    assert registry.sweep() == 1
    assert pool.state is PoolState.CLOSED
    assert ended(factory.drivers[0])
    assert registry.pools() == []
    assert registry.sweep() == 0


async def test_a_borrow_queued_behind_close_all_pools_gets_a_new_pool_with_the_new_config(
    factory: FakeDriverFactory,
    unraisable: list[Any],
    fake_registry: Callable[..., GlobalNeo4jConnectionPool],
) -> None:
    """The rollout of a new configuration: set it, close every pool, borrow again.

    A borrower that runs between the close taking the pool out of the registry
    and the pool's close starting must get a new pool, not the one being closed.
    """
    registry = fake_registry(uri="bolt://old.example:7687")
    await registry.return_connection(await within(registry.borrow_connection()))  # a pool in use
    old = await registry.get_pool()
    go = asyncio.Event()

    async def next_task() -> tuple[EventLoopConnectionPool, bool]:
        await go.wait()
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            assert borrowed.connection is not None
            pool = borrowed.connection.pool
            await asyncio.sleep(DEADLINE)  # a query outliving the old pool's close
            await borrowed.get_driver()  # still usable: raises if its pool closed under it
            return pool, pool.state is PoolState.OPEN

    task = asyncio.create_task(next_task())
    await asyncio.sleep(0)  # it waits for the go
    GlobalNeo4jConnectionPool.set_config(make_config(uri="bolt://new.example:7687"))
    go.set()
    await registry.close_all_pools(timeout=DEADLINE / 4)
    pool, open_after = await within(task)
    assert pool is not old
    assert pool.config.uri == "bolt://new.example:7687"
    assert open_after
    assert old.state is PoolState.CLOSED
    await registry.close_all_pools(timeout=0)


# -- the registry's closes are bounded -------------------------------------------------------


async def test_close_all_pools_returns_within_its_timeout_when_a_driver_close_hangs(
    factory: FakeDriverFactory,
    unraisable: list[Any],
    fake_registry: Callable[..., GlobalNeo4jConnectionPool],
) -> None:
    registry = fake_registry(close_timeout=30)
    try:
        await registry.return_connection(await within(registry.borrow_connection()))
        pool = await registry.get_pool()
        factory.drivers[0].close_hangs = True
        _, took = await timed(registry.close_all_pools(timeout=DEADLINE))
        assert took < DEADLINE + SLACK
        await until(lambda: pool.state is PoolState.CLOSED)
        assert ended(factory.drivers[0])
        assert registry.pools() == []
        # Borrowing afterwards starts a new pool.
        lease = await within(registry.borrow_connection())
        assert lease.pool is not pool
        await registry.return_connection(lease)
    finally:
        await registry.close_all_pools(timeout=0)


def test_a_thread_closing_its_loop_while_a_helper_closes_its_pool_leaves_it_closed(
    factory: FakeDriverFactory,
    fake_registry: Callable[..., GlobalNeo4jConnectionPool],
) -> None:
    """``shutdown()`` closes an idle runner loop's pool on a helper thread, which holds
    the loop meanwhile; the thread's own ``close_thread_loop()`` finds it busy. The
    helper closes the loop when done: it is never left open and unowned."""
    registry = fake_registry(close_timeout=1.0)
    factory.close_hangs = True  # the driver's close takes the whole close_timeout
    worker = WorkerThread("closes-its-loop")

    async def borrow_and_return() -> None:
        await registry.return_connection(await registry.borrow_connection())

    worker.call(lambda: neopool.run(borrow_and_return()))
    loop = worker.call(runner.thread_loop)
    closer = WorkerThread("shuts-down")  # a Celery hook, say
    shutdown = closer.submit(lambda: registry.shutdown(timeout=5.0))
    assert eventually(lambda: factory.drivers[0].close_calls == 1)  # the helper holds the loop
    worker.call(lambda: runner.close_thread_loop(timeout=0.1))
    shutdown.result(LIMIT)
    assert eventually(loop.is_closed)
    assert loop not in runner.loops().values()
    assert ended(factory.drivers[0])
    worker.end()
    closer.end()


def test_shutdown_closes_a_pool_whose_loop_runs_in_another_thread_within_its_timeout(
    factory: FakeDriverFactory,
    unraisable: list[Any],
    fake_registry: Callable[..., GlobalNeo4jConnectionPool],
) -> None:
    registry = fake_registry(close_timeout=30)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        lease = asyncio.run_coroutine_threadsafe(registry.borrow_connection(), loop).result(LIMIT)
        pool = lease.pool
        factory.drivers[0].close_hangs = True
        assert registry.loop_reach(pool) is LoopReach.RUNNING
        started = loop.time()
        registry.shutdown(timeout=DEADLINE)  # drains the lease for half of it, then the close hangs
        assert loop.time() - started < DEADLINE + SLACK
        assert (
            asyncio.run_coroutine_threadsafe(
                within(until(lambda: pool.state is PoolState.CLOSED)), loop
            ).result(LIMIT)
            is None
        )
        assert ended(factory.drivers[0])
        asyncio.run_coroutine_threadsafe(registry.return_connection(lease), loop).result(LIMIT)
        assert pool.in_use == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LIMIT)
        loop.close()
