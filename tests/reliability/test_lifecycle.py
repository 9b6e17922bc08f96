"""How things end: every path a user takes closes or releases what neopool opened.

Each test reproduces a user's sequence and checks the effect (the server-side
connection gone, the descriptor count back, the call returned in time), never
only a flag.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from neo4j.exceptions import ServiceUnavailable

import neopool
from neopool import (
    BorrowedConnection,
    GlobalNeo4jConnectionPool,
    LeaseError,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    PoolClosed,
)
from neopool._release import driver_is_closed
from neopool.loop_pool import PoolState, create_driver
from neopool.runner import close_all_loops, close_thread_loop
from neopool.testing import BoltTarget, TcpProxy
from polling import eventually, eventually_async
from user_code import WorkerThread, one_query

from .conftest import open_fds

pytestmark = pytest.mark.timeout(120)


@pytest.mark.timing
def test_close_all_pools_closes_the_driver_of_an_idle_persistent_loop_and_nothing_hangs(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy
) -> None:
    worker = WorkerThread("neopool-idle-worker")
    assert worker.call(lambda: neopool.run(one_query())) == 1
    (pool,) = GlobalNeo4jConnectionPool().pools()
    driver = pool.driver
    assert driver is not None
    assert neopool_proxy.active_connections >= 1

    started = time.monotonic()
    asyncio.run(GlobalNeo4jConnectionPool().close_all_pools(timeout=5))
    assert time.monotonic() - started < 5.5
    assert driver_is_closed(driver)
    assert eventually(lambda: neopool_proxy.active_connections == 0)

    # The worker's loop is still usable, with a new pool; then its thread ends promptly.
    assert worker.call(lambda: neopool.run(one_query())) == 1
    started = time.monotonic()
    worker.end()
    assert not worker.thread.is_alive()
    assert time.monotonic() - started < 10
    assert eventually(lambda: neopool_proxy.active_connections == 0)


@pytest.mark.timing
def test_close_all_pools_is_bounded_in_total_with_idle_busy_and_closed_loops(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy
) -> None:
    idle = WorkerThread("neopool-idle")
    busy = WorkerThread("neopool-busy")
    assert idle.call(lambda: neopool.run(one_query())) == 1
    closed_loop = asyncio.new_event_loop()
    assert closed_loop.run_until_complete(one_query()) == 1
    closed_loop.close()

    holding = threading.Event()
    release = threading.Event()

    async def hold_a_lease() -> None:
        async with Neo4jConnectionFactory.borrow_connection():
            holding.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)

    busy_call = busy.submit(lambda: neopool.run(hold_a_lease()))
    assert holding.wait(30)

    started = time.monotonic()
    asyncio.run(GlobalNeo4jConnectionPool().close_all_pools(timeout=3))
    took = time.monotonic() - started
    release.set()
    busy_call.result(30)
    assert took < 3.5, f"close_all_pools(timeout=3) took {took:.2f} s"
    assert GlobalNeo4jConnectionPool().pools() == []
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    idle.end()
    busy.end()


@pytest.mark.timing
def test_close_all_pools_racing_a_loop_that_stops_returns_in_time(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy
) -> None:
    loop = asyncio.new_event_loop()
    started_running = threading.Event()
    close_began: list[bool] = []

    async def borrow_then_stop() -> None:
        await one_query()
        pool = await GlobalNeo4jConnectionPool().get_pool()
        started_running.set()
        # Stop under the close scheduled on this loop: once it has begun, not waiting for it.
        close_began.append(await eventually_async(lambda: pool.closed, timeout=30))

    thread = threading.Thread(target=loop.run_until_complete, args=(borrow_then_stop(),))
    thread.start()
    assert started_running.wait(30)
    began = time.monotonic()
    asyncio.run(GlobalNeo4jConnectionPool().close_all_pools(timeout=2))
    took = time.monotonic() - began
    assert took < 2.5, f"close_all_pools(timeout=2) took {took:.2f} s"
    thread.join(30)
    assert close_began == [True]
    loop.close()
    GlobalNeo4jConnectionPool().sweep()
    assert GlobalNeo4jConnectionPool().pools() == []

    # What the cut-short close still had open is released, at the latest with the loop.
    del loop
    with warnings.catch_warnings():  # the driver's own close, left pending on the dead loop
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        gc.collect()
    assert eventually(lambda: neopool_proxy.active_connections == 0)


def test_run_racing_close_all_loops_never_runs_on_a_closed_loop(
    proxied_config: Neo4jConnectionConfig,
) -> None:
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep_running() -> None:
        while not stop.is_set():
            try:
                assert neopool.run(one_query()) == 1
            except BaseException as exc:
                failures.append(exc)
                return

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        runners = [threading.Thread(target=keep_running) for _ in range(3)]
        for thread in runners:
            thread.start()
        for _ in range(20):
            close_all_loops(timeout=2)
        stop.set()
        for thread in runners:
            thread.join(30)
    assert failures == []


def test_threads_that_never_close_their_loops_leave_no_socket_and_no_descriptor(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy
) -> None:
    gc.collect()
    before = open_fds()

    def celery_style_thread() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one_query())  # and the thread ends without loop.close()

    for _ in range(5):
        threads = [threading.Thread(target=celery_style_thread) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    gc.collect()
    assert eventually(lambda: open_fds() <= before)
    assert GlobalNeo4jConnectionPool().pools() == []


def test_a_dropped_loop_is_not_kept_alive_by_the_registry(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, unraisable: list[Any]
) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(one_query())
    dropped = weakref.ref(loop)
    del loop
    gc.collect()
    assert dropped() is None
    assert GlobalNeo4jConnectionPool().pools() == []
    assert eventually(lambda: neopool_proxy.active_connections == 0)  # nor its sockets


async def _close_the_pool_while_a_borrower_opens_its_driver(proxy: TcpProxy) -> BaseException:
    """A borrower in a task group opens the loop's driver (slowed by ``proxy``) when the pool
    is closed under it; what the task group raised."""
    proxy.set_latency(200)  # the driver takes a while to open
    pool = await GlobalNeo4jConnectionPool().get_pool()

    async def borrower() -> None:
        async with Neo4jConnectionFactory.borrow_connection():
            pass

    async def borrow_in_a_task_group_while_the_pool_closes() -> None:
        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
            group.create_task(borrower())
            # The borrower is opening the driver (connected, slowed by the proxy's latency).
            assert await eventually_async(lambda: proxy.connections_opened > 0)
            assert pool.driver is None
            await pool.close(timeout=1)

    with pytest.raises(ExceptionGroup) as raised:  # noqa: F821 - 3.11+
        await borrow_in_a_task_group_while_the_pool_closes()
    assert (pool.state, pool.driver) == (PoolState.CLOSED, None)  # nothing half-open kept
    return raised.value


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is 3.11+")
async def test_a_pool_closed_while_its_driver_opens_fails_the_borrower_with_pool_closed(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    raised = await _close_the_pool_while_a_borrower_opens_its_driver(neopool_proxy)
    assert [type(e) for e in raised.exceptions] == [PoolClosed]  # type: ignore[attr-defined]
    gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is 3.11+")
async def test_a_driver_open_cut_short_by_a_close_leaves_no_unretrieved_exception(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    await _close_the_pool_while_a_borrower_opens_its_driver(neopool_proxy)
    gc.collect()  # the borrower's error is not kept this time
    assert "never retrieved" not in caplog.text


async def test_a_replaced_driver_is_closed_even_while_a_lease_stays_out(
    neopool_bolt: BoltTarget, configure: Callable[..., Neo4jConnectionConfig]
) -> None:
    """The first driver's network goes away; its replacement talks through another proxy."""
    host, port = "127.0.0.1", int(neopool_bolt.uri.rsplit(":", 1)[1])
    with TcpProxy(host, port) as first, TcpProxy(host, port) as second:
        made: list[Any] = []

        def through_first_then_second(config: Neo4jConnectionConfig) -> Any:
            proxy = second if made else first
            made.append(create_driver(config.model_copy(update={"uri": proxy.uri()})))
            return made[-1]

        configure(pool_min_size=1, close_timeout=0.5, connection_timeout=1.0)
        GlobalNeo4jConnectionPool.set_driver_factory(through_first_then_second)  # reset after
        try:
            pool = await GlobalNeo4jConnectionPool().get_pool()
            long_held = await pool.borrow()  # held for the whole test, as a long job would
            old = await long_held.get_driver()
            first.set_blackhole(True)
            first.cut_all()
            other = await pool.borrow()
            await pool.return_connection(other, ServiceUnavailable("the network went away"))
            fresh = await pool.borrow()  # the old driver fails its check: a new one opens
            assert await fresh.get_driver() is made[1] is not old
            await pool.return_connection(fresh)
            assert await eventually_async(lambda: driver_is_closed(old), timeout=5)
            assert pool.in_use == 1  # the long-held lease is still out
            await pool.return_connection(long_held)
        finally:  # while both proxies still run
            await GlobalNeo4jConnectionPool().close_all_pools()


async def test_two_coroutines_entering_one_borrowed_connection_lose_no_lease(
    proxied_config: Neo4jConnectionConfig,
) -> None:
    borrowed = Neo4jConnectionFactory.borrow_connection()
    results = await asyncio.gather(
        borrowed.__aenter__(), borrowed.__aenter__(), return_exceptions=True
    )
    assert [type(r) for r in results].count(LeaseError) == 1
    assert [r for r in results if isinstance(r, BorrowedConnection)] == [borrowed]
    await borrowed.__aexit__(None, None, None)
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert pool.in_use == 0


async def test_a_lease_dropped_without_return_comes_back_with_one_warning(
    proxied_config: Neo4jConnectionConfig, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await GlobalNeo4jConnectionPool().get_pool()

    async def borrow_and_forget() -> None:
        await pool.borrow()  # never returned, never kept

    caplog.set_level(logging.WARNING, logger="neopool")
    for _ in range(pool.max_size):
        await borrow_and_forget()
    gc.collect()
    assert await eventually_async(lambda: pool.in_use == 0, timeout=5)
    lease = await pool.borrow(timeout=1)  # capacity is back
    await pool.return_connection(lease)
    lines = [
        r
        for r in caplog.records
        if "garbage-collected" in r.getMessage() and pool.loop_id in r.getMessage()
    ]
    assert len(lines) == 1
    assert "borrow_and_forget" in lines[0].getMessage()


@pytest.mark.timing
def test_close_all_loops_is_bounded_in_total_and_works_from_async_code(
    proxied_config: Neo4jConnectionConfig, neopool_proxy: TcpProxy
) -> None:
    workers = [WorkerThread(f"neopool-busy-{i}") for i in range(3)]
    release = threading.Event()
    holding = threading.Semaphore(0)

    async def busy() -> None:
        await one_query()
        holding.release()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)

    calls = [worker.submit(lambda: neopool.run(busy())) for worker in workers]
    for _ in workers:
        assert holding.acquire(timeout=30)

    async def from_async() -> int:
        return close_all_loops(timeout=1)

    started = time.monotonic()
    closed = asyncio.run(from_async())
    took = time.monotonic() - started
    assert took < 1.5, f"close_all_loops(timeout=1) took {took:.2f} s for 3 busy loops"
    assert closed == 0  # all busy: each closes when its call returns
    release.set()
    for call in calls:
        call.result(30)
    assert eventually(lambda: neopool.runner.loops() == {})
    assert eventually(lambda: neopool_proxy.active_connections == 0)
    for worker in workers:
        worker.end()


def test_a_call_leaves_no_task_behind_but_the_loop_pool_and_driver_stay(
    proxied_config: Neo4jConnectionConfig,
) -> None:
    cancelled = threading.Event()

    async def spawn_and_leave() -> int:
        async def background() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                cancelled.set()

        asyncio.get_running_loop().create_task(background())
        return await one_query()

    assert neopool.run(spawn_and_leave()) == 1
    assert cancelled.is_set()
    loop = neopool.runner.thread_loop()
    assert [t for t in asyncio.all_tasks(loop) if not t.done()] == []
    (pool,) = GlobalNeo4jConnectionPool().pools()
    assert pool.state is PoolState.OPEN
    assert pool.loop is loop
    assert neopool.run(one_query()) == 1
    assert pool.stats()["drivers_created"] == 1
    close_thread_loop()
