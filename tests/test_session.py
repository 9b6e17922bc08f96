"""The one-call session: a lease and a driver session, opened and given back together.

``Neo4jConnectionFactory.session()`` and ``execute_query()`` must leave the
pool as they found it on every path (a normal exit, an exception, cancellation
inside the block or while the server does not answer), and nested use in one
task must run on the task's lease, so that it never waits for a second one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from neo4j import AsyncSession
from neo4j.exceptions import ServiceUnavailable, SessionExpired

from neopool import EventLoopConnectionPool, GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.errors import LeaseError
from neopool.testing import TcpProxy
from polling import eventually_async

pytestmark = pytest.mark.timeout(60)


async def this_loops_pool() -> EventLoopConnectionPool:
    return await GlobalNeo4jConnectionPool().get_pool()


async def test_a_session_runs_queries_and_gives_session_and_lease_back(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=1, pool_min_size=0)
    async with Neo4jConnectionFactory.session(database="neo4j") as session:
        pool = await this_loops_pool()
        assert pool.in_use == 1
        result = await session.run("RETURN 41 + 1 AS answer")
        record = await result.single()
    assert record is not None
    assert record["answer"] == 42
    assert session.closed()
    assert pool.in_use == 0
    assert pool.borrows == 1


async def test_an_exception_inside_closes_the_session_and_returns_the_lease(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=1, pool_min_size=0)
    opened: list[AsyncSession] = []

    async def fail_inside() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            opened.append(session)
            await session.run("RETURN 1")
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await fail_inside()
    pool = await this_loops_pool()
    assert opened[0].closed()
    assert pool.in_use == 0
    # The one lease is free again: a second session gets it at once.
    async with Neo4jConnectionFactory.session(database="neo4j") as session:
        await session.run("RETURN 1")


async def test_cancelling_a_task_inside_a_session_returns_the_lease(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=1, pool_min_size=0)
    inside = asyncio.Event()
    opened: list[AsyncSession] = []

    async def hold_forever() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            opened.append(session)
            await session.run("RETURN 1")
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_forever())
    await inside.wait()
    pool = await this_loops_pool()
    assert pool.in_use == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert opened[0].closed()
    assert pool.in_use == 0


@pytest.mark.timing
async def test_cancelling_a_query_the_server_never_answers_returns_the_lease(
    configure: Callable[..., Any], neopool_proxy: TcpProxy
) -> None:
    configure(uri=neopool_proxy.uri(), pool_max_size=1, pool_min_size=0)
    started = asyncio.Event()

    async def stuck_query() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            neopool_proxy.set_blackhole(True)
            started.set()
            await (await session.run("RETURN 2")).consume()

    task = asyncio.create_task(stuck_query())
    await started.wait()
    pool = await this_loops_pool()
    await asyncio.sleep(0.1)  # the query is on its way to a server that never answers
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert pool.in_use == 0
    neopool_proxy.set_blackhole(False)
    records, _, _ = await Neo4jConnectionFactory.execute_query("RETURN 3 AS n", database="neo4j")
    assert records[0]["n"] == 3


async def test_cancelling_a_borrower_waiting_for_a_lease_loses_nothing(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=1, pool_min_size=0)
    async with Neo4jConnectionFactory.session(database="neo4j"):
        pool = await this_loops_pool()

        async def wait_for_one() -> None:
            async with Neo4jConnectionFactory.session(database="neo4j"):
                pass  # pragma: no cover - never gets the lease

        waiter = asyncio.create_task(wait_for_one())
        assert await eventually_async(lambda: pool.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.waiting == 0
    assert pool.in_use == 0
    assert pool.available == 1


async def test_nested_sessions_in_one_task_share_its_lease_at_pool_max_size_1(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=1, pool_min_size=0, borrow_timeout=2.0)

    async def count_nodes() -> int:  # a storage method that opens its own session
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            record = await (await session.run("RETURN 7 AS n")).single()
            assert record is not None
            return int(record["n"])

    async with Neo4jConnectionFactory.session(database="neo4j") as outer:
        pool = await this_loops_pool()
        await outer.run("RETURN 1")
        assert await count_nodes() == 7  # would wait for a second lease, then PoolTimeout
        records, _, _ = await Neo4jConnectionFactory.execute_query("RETURN 8 AS n")
        assert records[0]["n"] == 8
        assert await Neo4jConnectionFactory.prepare_database("nested", "neo4j") == "neo4j"
        assert pool.in_use == 1
    async with Neo4jConnectionFactory.borrow_connection():
        assert await count_nodes() == 7  # a borrow_connection() of the task counts too
    assert pool.in_use == 0
    assert pool.borrows == 2


async def test_tasks_spawned_inside_a_session_borrow_their_own_leases(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=3, pool_min_size=0)
    in_use: list[int] = []

    async def child() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await session.run("RETURN 1")
            in_use.append((await this_loops_pool()).in_use)
            await asyncio.sleep(0.05)

    async with Neo4jConnectionFactory.session(database="neo4j"):
        await asyncio.gather(child(), child())
    pool = await this_loops_pool()
    assert max(in_use) == 3  # the parent's lease and one per child: never shared across tasks
    assert pool.in_use == 0
    assert pool.borrows == 3


async def test_a_session_lent_to_nested_code_is_not_lent_after_it_ends(
    configure: Callable[..., Any],
) -> None:
    configure(pool_max_size=2, pool_min_size=0)
    async with Neo4jConnectionFactory.session(database="neo4j"):
        pass
    async with Neo4jConnectionFactory.session(database="neo4j"):
        pool = await this_loops_pool()
        assert pool.in_use == 1  # a new borrow, not the returned lease
    assert pool.borrows == 2


async def test_a_nested_sessions_connectivity_error_has_the_driver_checked_before_the_next_borrow(
    configure: Callable[..., Any], neopool_proxy: TcpProxy
) -> None:
    """The nested session meets the error and the borrow around it then ends cleanly: the lease
    goes back with the error all the same, so the driver is checked before it is lent again."""
    configure(uri=neopool_proxy.uri(), pool_max_size=1, pool_min_size=0)

    async def a_query_the_network_cuts() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            neopool_proxy.cut_all()
            await (await session.run("RETURN 2")).consume()

    async with Neo4jConnectionFactory.borrow_connection():
        with pytest.raises((ServiceUnavailable, SessionExpired)):
            await a_query_the_network_cuts()
    opened = neopool_proxy.connections_opened
    async with Neo4jConnectionFactory.borrow_connection():
        assert neopool_proxy.connections_opened > opened  # the check connected to the server
    assert (await this_loops_pool()).in_use == 0


async def test_execute_query_gives_the_lease_back_after_an_error(
    configure: Callable[..., Any],
) -> None:
    from neo4j.exceptions import CypherSyntaxError

    configure(pool_max_size=1, pool_min_size=0)
    with pytest.raises(CypherSyntaxError):
        await Neo4jConnectionFactory.execute_query("THIS IS NOT CYPHER", database="neo4j")
    pool = await this_loops_pool()
    assert pool.in_use == 0
    records, _, _ = await Neo4jConnectionFactory.execute_query(
        "RETURN $x AS x", {"x": 5}, database="neo4j"
    )
    assert records[0]["x"] == 5


async def test_a_session_cannot_be_entered_twice(configure: Callable[..., Any]) -> None:
    configure(pool_min_size=0)
    session = Neo4jConnectionFactory.session(database="neo4j")
    async with session:
        with pytest.raises(LeaseError, match="open already"):
            await session.__aenter__()
    assert (await this_loops_pool()).in_use == 0


def test_a_session_works_in_loops_of_their_own(configure: Callable[..., Any]) -> None:
    """Each loop borrows from its own pool, and asyncio.run closes it at its end."""
    configure(pool_min_size=0)

    async def one() -> int:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            record = await (await session.run("RETURN 1 AS n")).single()
            assert record is not None
            return int(record["n"])

    assert asyncio.run(one()) == 1
    assert asyncio.run(one()) == 1


async def test_a_lease_held_for_an_objects_life_is_lent_only_to_the_task_that_took_it(
    configure: Callable[..., Any],
) -> None:
    """The design note's pattern: __aenter__ in initialize(), __aexit__ in finalize()."""
    configure(pool_max_size=2, pool_min_size=0)
    borrowed = Neo4jConnectionFactory.borrow_connection()
    await asyncio.create_task(borrowed.__aenter__())  # initialize() ran in another task
    pool = await this_loops_pool()

    async def one_session() -> int:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await session.run("RETURN 1")
            return pool.in_use

    assert await one_session() == 2  # this task does not hold that lease: it borrows
    await borrowed.__aexit__(None, None, None)
    assert pool.in_use == 0


async def test_a_lease_lent_to_a_session_stays_out_until_the_session_ends(
    configure: Callable[..., Any],
) -> None:
    """The note's pattern, finalised while a session on its lease is still open: the lease
    goes back when its last user ends, never under a session that still runs on it."""
    configure(pool_max_size=1, pool_min_size=0)
    borrowed = Neo4jConnectionFactory.borrow_connection()
    await borrowed.__aenter__()  # initialize()
    pool = await this_loops_pool()
    async with Neo4jConnectionFactory.session(database="neo4j") as session:
        await borrowed.__aexit__(None, None, None)  # finalize(), with the session open
        assert borrowed.connection is None
        assert pool.in_use == 1  # still the session's
        record = await (await session.run("RETURN 2 AS n")).single()
        assert record is not None
        assert record["n"] == 2
    assert pool.in_use == 0
    assert pool.borrows == 1
