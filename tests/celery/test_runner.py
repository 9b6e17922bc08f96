"""neopool.run: one loop per thread, reused, closed cleanly, interruptible."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import neopool
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.runner import LoopAlreadyRunning, close_thread_loop

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry(neopool_registry: GlobalNeo4jConnectionPool) -> Iterator[GlobalNeo4jConnectionPool]:
    yield neopool_registry
    close_thread_loop()


async def borrow_once() -> tuple[int, int]:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        async with driver.session(database=await borrowed.prepare_database("runner")) as s:
            await (await s.run("RETURN 1")).consume()
    return id(asyncio.get_running_loop()), id(driver)


def test_calls_in_one_thread_share_its_loop_and_driver(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    first = neopool.run(borrow_once())
    second = neopool.run(borrow_once())
    assert first == second
    (pool,) = registry.pools()
    assert pool.stats()["drivers_created"] == 1
    assert pool.stats()["borrows"] == 2


def test_each_thread_has_its_own_loop_closed_when_the_thread_ends(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    seen: list[Any] = []

    def work() -> None:
        seen.append(neopool.run(borrow_once()))
        seen.append(neopool.run(borrow_once()))
        (pool,) = [p for p in registry.pools() if p.loop is neopool.runner.thread_loop()]
        seen.append(pool)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen[0] == seen[1]
    assert seen[0][0] != neopool.run(borrow_once())[0]
    pool = seen[2]
    assert pool.closed  # closed on its own loop as the thread ended
    assert pool.driver is not None
    assert pool not in registry.pools()


def test_close_thread_loop_closes_the_pool_and_a_new_loop_follows(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    neopool.run(borrow_once())
    (pool,) = registry.pools()
    close_thread_loop()
    assert pool.closed
    assert pool.loop is not None
    assert pool.loop.is_closed()
    neopool.run(borrow_once())
    (new_pool,) = registry.pools()
    assert new_pool is not pool


def test_run_inside_a_running_loop_is_a_clear_error() -> None:
    async def nested() -> None:
        neopool.run(asyncio.sleep(0))

    with pytest.raises(LoopAlreadyRunning, match="Await the coroutine instead"):
        asyncio.run(nested())


class Interrupted(Exception):
    """Raised from a signal handler, as Celery raises SoftTimeLimitExceeded."""


def test_an_interrupt_cancels_the_coroutine_and_returns_its_lease(
    registry: GlobalNeo4jConnectionPool,
) -> None:
    holding = threading.Event()

    async def hold() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as borrowed:
            await borrowed.get_driver()
            holding.set()
            await asyncio.sleep(30)

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            neopool.run(hold())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert holding.is_set()
    (pool,) = registry.pools()
    assert pool.stats()["in_use"] == 0
    neopool.run(borrow_once())  # the loop still works
    assert pool.stats()["drivers_created"] == 1
