"""Bad input at every public entry point: a clear error, and the pool stays consistent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from neopool import (
    BorrowedConnection,
    ConfigError,
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    LeaseError,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    NoRunningLoop,
)
from neopool.testing import BoltTarget

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-Pa55word"


@pytest.fixture
async def pool(neopool_bolt: BoltTarget) -> AsyncIterator[EventLoopConnectionPool]:
    pool = EventLoopConnectionPool(neopool_bolt.config(pool_max_size=2, pool_min_size=1))
    await pool.get_driver()
    yield pool
    await pool.close()


def _consistent(pool: EventLoopConnectionPool) -> None:
    assert pool.available + pool.in_use == pool.total <= pool.max_size
    assert pool.waiting == 0


# -- configuration ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"uri": "http://localhost:7687"}, "uri"),
        ({"uri": ""}, "uri"),
        ({"uri": f"bolt://neo4j:{SECRET}@localhost:7687"}, "uri"),
        ({"uri": "bolt://localhost:7687", "pool_max_size": 0}, "pool_max_size"),
        ({"uri": "bolt://localhost:7687", "pool_max_size": "many"}, "pool_max_size"),
        ({"uri": "bolt://localhost:7687", "pool_min_size": 5, "pool_max_size": 2}, "pool_min_size"),
        ({"uri": "bolt://localhost:7687", "borrow_timeout": -1}, "borrow_timeout"),
        ({"uri": "bolt://localhost:7687", "connection_timeout": 0}, "connection_timeout"),
        ({"uri": "bolt://localhost:7687", "pool_max_sise": 3}, "pool_max_sise"),
    ],
)
def test_a_bad_setting_is_a_config_error_that_names_it_and_hides_the_password(
    settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Neo4jConnectionConfig(password=SECRET, **settings)
    message = str(caught.value)
    assert named in message
    assert SECRET not in message
    assert SECRET not in repr(caught.value)


def test_set_config_refuses_anything_but_a_config() -> None:
    with pytest.raises(ConfigError, match="Neo4jConnectionConfig"):
        GlobalNeo4jConnectionPool.set_config({"uri": "bolt://localhost:7687"})  # type: ignore[arg-type]


def test_a_config_never_shows_its_password(neopool_bolt: BoltTarget) -> None:
    config = neopool_bolt.config()
    for text in (repr(config), str(config), str(config.model_dump())):
        assert neopool_bolt.password not in text or not neopool_bolt.password


# -- workspace names ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "workspace",
    [
        "plain",
        "with space",
        "back`tick",
        "``",
        "x`) DETACH DELETE n //",
        "工作区",
        "a" * 300,
        "",
        None,
    ],
)
async def test_any_workspace_name_prepares_safely(
    neopool_bolt: BoltTarget, neopool_registry: GlobalNeo4jConnectionPool, workspace: str | None
) -> None:
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(database="neo4j"))
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query("MERGE (:BadInputSentinel {k: 1})", database_="neo4j")
        assert await borrowed.prepare_database(workspace) == "neo4j"
        records, _, _ = await driver.execute_query(
            "MATCH (n:BadInputSentinel) RETURN count(n) AS c", database_="neo4j"
        )
        assert records[0]["c"] >= 1  # nothing was injected
    _consistent(await neopool_registry.get_pool())


# -- returning the wrong thing ------------------------------------------------------------
@pytest.mark.parametrize("foreign", [None, "lease", 42, object()])
async def test_returning_a_foreign_object_is_a_lease_error(
    pool: EventLoopConnectionPool, neopool_registry: GlobalNeo4jConnectionPool, foreign: Any
) -> None:
    lease = await pool.borrow()
    with pytest.raises(LeaseError, match="PooledConnectionManager"):
        await pool.return_connection(foreign)
    with pytest.raises(LeaseError, match="PooledConnectionManager"):
        await neopool_registry.return_connection(foreign)
    assert pool.in_use == 1
    await pool.return_connection(lease)
    _consistent(pool)


async def test_returning_a_lease_to_another_pool_is_a_lease_error(
    pool: EventLoopConnectionPool, neopool_bolt: BoltTarget
) -> None:
    other = EventLoopConnectionPool(neopool_bolt.config())
    lease = await other.borrow()
    try:
        with pytest.raises(LeaseError, match="belongs to the pool"):
            await pool.return_connection(lease)
        assert other.in_use == 1
        _consistent(pool)
    finally:
        await other.return_connection(lease)
        await other.close()
    assert other.in_use == 0


async def test_a_lease_used_or_returned_after_its_return_is_a_lease_error(
    pool: EventLoopConnectionPool,
) -> None:
    lease = await pool.borrow()
    await pool.return_connection(lease)
    with pytest.raises(LeaseError, match="returned"):
        await lease.get_driver()
    with pytest.raises(LeaseError, match="already returned"):
        await pool.return_connection(lease)
    _consistent(pool)
    again = await pool.borrow()  # the pool still lends
    await pool.return_connection(again)


async def test_a_borrowed_connection_used_outside_its_block_is_a_lease_error(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    borrowed = Neo4jConnectionFactory.borrow_connection()
    with pytest.raises(LeaseError, match="not borrowed"):
        await borrowed.get_driver()
    async with borrowed:
        with pytest.raises(LeaseError, match="already holds"):
            await borrowed.__aenter__()
    with pytest.raises(LeaseError, match="not borrowed"):
        await borrowed.prepare_database("x")
    await borrowed.__aexit__(None, None, None)  # a second exit is harmless
    _consistent(await neopool_registry.get_pool())


# -- timeouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [-1, "5", float("nan"), True])
async def test_a_bad_borrow_timeout_is_refused_before_anyone_queues(
    pool: EventLoopConnectionPool, timeout: Any
) -> None:
    held = [await pool.borrow() for _ in range(pool.max_size)]
    with pytest.raises(ValueError, match="timeout"):
        await pool.borrow(timeout)
    _consistent(pool)
    for lease in held:
        await pool.return_connection(lease)
    lease = await pool.borrow()  # nobody phantom is first in line for it
    await pool.return_connection(lease)
    _consistent(pool)


# -- loops ---------------------------------------------------------------------------------
def _drive_without_a_loop(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        coro.send(None)
    finally:
        coro.close()


def test_calling_from_no_running_loop_is_a_clear_error(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    with pytest.raises(NoRunningLoop, match="running event loop"):
        _drive_without_a_loop(neopool_registry.borrow_connection())
    with pytest.raises(NoRunningLoop, match="running event loop"):
        _drive_without_a_loop(neopool_registry.get_pool())
    with pytest.raises(NoRunningLoop):
        _drive_without_a_loop(BorrowedConnection().__aenter__())
    assert neopool_registry.pools() == []


async def test_a_lease_used_from_another_loop_is_a_lease_error(
    pool: EventLoopConnectionPool,
) -> None:
    lease = await pool.borrow()
    errors: list[BaseException] = []

    def elsewhere() -> None:
        for call in (lease.get_driver, lambda: pool.return_connection(lease), pool.borrow):
            try:
                asyncio.run(call())
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(30)
    assert len(errors) == 3
    assert all(isinstance(e, LeaseError) and "loop" in str(e) for e in errors)
    assert pool.in_use == 1  # still held here, where it belongs
    await pool.return_connection(lease)
    _consistent(pool)
