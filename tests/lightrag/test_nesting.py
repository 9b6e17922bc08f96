"""A storage session and neopool's own sessions nested in one task run on one lease.

A project that keeps ``PooledNeo4JStorage`` beside storages of its own (built on
``Neo4jConnectionFactory.session``) calls one from the other: a storage method
that also writes through a helper, or a helper that reads the graph through
LightRAG. At ``pool_max_size=1`` a second lease never comes, so each of these
would end in ``PoolTimeout`` unless the nested code uses the lease held around it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")

from neopool import EventLoopConnectionPool, GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.integrations.lightrag import PooledNeo4JStorage

pytestmark = [pytest.mark.lightrag, pytest.mark.timeout(120)]


def node(entity_id: str) -> dict[str, str]:
    return {"entity_id": entity_id, "entity_type": "concept", "description": entity_id}


def new_storage() -> PooledNeo4JStorage:
    return PooledNeo4JStorage(
        namespace="chunk_entity_relation",
        global_config={"working_dir": "."},
        embedding_func=None,
        workspace=f"nesting-{uuid.uuid4().hex[:8]}",
    )


async def this_loops_pool() -> EventLoopConnectionPool:
    return await GlobalNeo4jConnectionPool().get_pool()


async def audit(entity_id: str) -> int:
    """A helper of the project's own, on neopool's one-call session."""
    async with Neo4jConnectionFactory.session(database="neo4j") as session:
        await (await session.run("RETURN $id AS id", id=entity_id)).consume()
    records, _, _ = await Neo4jConnectionFactory.execute_query("RETURN 1 AS n", database="neo4j")
    return int(records[0]["n"])


class AuditedStorage(PooledNeo4JStorage):  # type: ignore[misc]
    """A storage whose write also calls the project's helper, inside its own session."""

    async def upsert_node(self, node_id: str, node_data: dict[str, str]) -> None:
        async with self._driver.session(database=self._DATABASE) as session:
            await (await session.run("RETURN 1")).consume()
            await super().upsert_node(node_id, node_data)  # LightRAG's session, nested
            assert await audit(node_id) == 1


@pytest.fixture
def one_lease(configure: Any, neopool_registry: GlobalNeo4jConnectionPool) -> None:
    configure(pool_max_size=1, pool_min_size=0, borrow_timeout=2.0)


@pytest.mark.usefixtures("one_lease")
async def test_neopool_sessions_inside_a_storage_session_use_its_lease() -> None:
    storage = AuditedStorage(
        namespace="chunk_entity_relation",
        global_config={"working_dir": "."},
        embedding_func=None,
        workspace=f"nesting-{uuid.uuid4().hex[:8]}",
    )
    await storage.initialize()
    try:
        await storage.upsert_node("A", node("A"))  # PoolTimeout if audit() waited for a lease
        assert await storage.has_node("A")
        pool = await this_loops_pool()
        assert pool.in_use == 0
        async with storage._driver.session(database=storage._DATABASE):
            assert await Neo4jConnectionFactory.prepare_database("nesting", "neo4j") == "neo4j"
            assert pool.in_use == 1
        assert pool.in_use == 0
        assert pool.stats()["timeouts"] == 0
    finally:
        await storage.drop()
        await storage.finalize()


@pytest.mark.usefixtures("one_lease")
async def test_storage_calls_inside_a_neopool_session_use_its_lease() -> None:
    storage = new_storage()
    async with Neo4jConnectionFactory.session(database="neo4j") as session:
        await (await session.run("RETURN 1")).consume()
        pool = await this_loops_pool()
        await storage.initialize()  # prepares its database on the session's lease
        await storage.upsert_nodes_batch([("A", node("A")), ("B", node("B"))])
        await storage.upsert_edge("A", "B", {"weight": "1.0"})
        assert await storage.node_degree("A") == 1
        graph = await storage.get_knowledge_graph("A", max_depth=2)
        assert {n.labels[0] for n in graph.nodes} == {"A", "B"}
        assert pool.in_use == 1
    assert pool.in_use == 0
    async with Neo4jConnectionFactory.borrow_connection():
        assert await storage.has_node("B")  # a borrow_connection() of the task lends its lease too
        assert pool.in_use == 1
    assert pool.in_use == 0
    assert pool.stats()["timeouts"] == 0
    await storage.drop()
    await storage.finalize()


@pytest.mark.usefixtures("one_lease")
async def test_a_helper_awaited_through_wait_for_inside_a_storage_session_uses_its_lease() -> None:
    """``asyncio.wait_for`` runs the helper in a task of its own before Python 3.12: a task
    spawned inside a storage session uses its lease, as storage sessions there always did."""
    storage = new_storage()
    await storage.initialize()
    try:
        pool = await this_loops_pool()
        async with storage._driver.session(database=storage._DATABASE):
            assert await asyncio.wait_for(audit("A"), 10) == 1
            assert pool.in_use == 1
        assert pool.in_use == 0
        assert pool.stats()["timeouts"] == 0
    finally:
        await storage.finalize()


async def test_a_lease_shared_with_a_spawned_task_goes_back_when_its_last_user_ends(
    configure: Any, neopool_registry: GlobalNeo4jConnectionPool
) -> None:
    """The storage session ends while a task it spawned is still in a neopool session on its
    lease: the lease stays out for that session (and is lent inside it), and comes back when it
    ends."""
    configure(pool_max_size=2, pool_min_size=0)
    storage = new_storage()
    await storage.initialize()
    inside, leave = asyncio.Event(), asyncio.Event()

    async def outlives_its_parent() -> None:
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            inside.set()
            await leave.wait()
            await (await session.run("RETURN 1")).consume()  # the lease is still this session's
            await audit("child")  # and lent to the code inside it, as before

    try:
        pool = await this_loops_pool()
        borrows = pool.borrows
        async with storage._driver.session(database=storage._DATABASE):
            child = asyncio.create_task(outlives_its_parent())
            await inside.wait()
            assert pool.in_use == 1  # the child uses the storage session's lease
        assert pool.in_use == 1  # still the child's
        leave.set()
        await child
        assert pool.in_use == 0
        assert pool.borrows == borrows + 1  # one borrow, for both
    finally:
        await storage.finalize()


async def test_a_task_spawned_in_a_storage_session_borrows_its_own_lease_once_it_ends(
    configure: Any, neopool_registry: GlobalNeo4jConnectionPool
) -> None:
    """The note's pattern holds a lease for the object's life; a storage session in that task
    joins it and lends it to the tasks it spawns while it lasts, not after: a task spawned there
    that goes on borrows its own lease for its later sessions."""
    configure(pool_max_size=2, pool_min_size=0)
    storage = new_storage()
    await storage.initialize()
    session_over = asyncio.Event()
    in_use: list[int] = []
    borrowed = Neo4jConnectionFactory.borrow_connection()
    await borrowed.__aenter__()  # initialize()
    pool = await this_loops_pool()

    async def goes_on_after_the_session() -> None:
        await session_over.wait()
        async with Neo4jConnectionFactory.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            in_use.append(pool.in_use)

    try:
        async with storage._driver.session(database=storage._DATABASE):
            child = asyncio.create_task(goes_on_after_the_session())
        session_over.set()
        await child
        assert in_use == [2]  # a lease of its own beside the held one, not the held one
        assert pool.in_use == 1
    finally:
        await borrowed.__aexit__(None, None, None)  # finalize()
        await storage.finalize()
    assert pool.in_use == 0
