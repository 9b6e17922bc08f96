"""A graph storage of one's own, on the one-call session, against the real server.

Projects keep their own storages (often a LightRAG copy of their own, with its
own base class), so neopool's recipe must not need upstream ``Neo4JStorage``.
:class:`GraphStorage` is that recipe at its smallest, shaped like ApeRAG's
storage: every node carries one label (``base`` there) with ``entity_id`` as its
key; each method opens one session (a lease for the session's life); writes run
as managed transactions, which the driver retries. docs/guides/own-storage.md
shows the same class.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from neo4j import AsyncManagedTransaction
from neo4j.exceptions import ConstraintError

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.database import Schema, quote_identifier
from neopool.errors import MissingDatabase
from neopool.testing import BoltTarget

pytestmark = pytest.mark.timeout(60)


class GraphStorage:
    """A graph of nodes keyed by ``entity_id`` under one label, in the workspace's database."""

    def __init__(self, workspace: str, label: str = "base") -> None:
        self.workspace = workspace
        self.label = label
        self._label = quote_identifier(label)  # a label cannot be a parameter: quote it
        self.database: str | None = None

    async def initialize(self) -> None:
        """The workspace's database, with ``entity_id`` unique on the label (once per process)."""
        self.database = await Neo4jConnectionFactory.prepare_database(
            self.workspace, schema=Schema.unique(label=self.label, key="entity_id")
        )

    async def upsert_node(self, node_id: str, data: dict[str, Any]) -> None:
        async def write(tx: AsyncManagedTransaction) -> None:
            await tx.run(
                f"MERGE (n:{self._label} {{entity_id: $id}}) SET n += $data",
                id=node_id,
                data=data,
            )

        async with Neo4jConnectionFactory.session(database=self.database) as session:
            try:
                await session.execute_write(write)
            except ConstraintError:
                # Neo4j locks a MERGE on a uniquely constrained key; ArcadeDB fails the
                # transaction that lost the race to create it: run again, it matches now.
                await session.execute_write(write)

    async def get_node(self, node_id: str) -> dict[str, Any] | None:
        records, _, _ = await Neo4jConnectionFactory.execute_query(
            f"MATCH (n:{self._label} {{entity_id: $id}}) RETURN n",
            {"id": node_id},
            database=self.database,
        )
        return dict(records[0]["n"]) if records else None

    async def upsert_edge(self, source: str, target: str, data: dict[str, Any]) -> None:
        async def write(tx: AsyncManagedTransaction) -> None:
            await tx.run(
                f"MATCH (a:{self._label} {{entity_id: $source}}) WITH a "
                f"MATCH (b:{self._label} {{entity_id: $target}}) "
                f"MERGE (a)-[r:DIRECTED]-(b) SET r += $data",
                source=source,
                target=target,
                data=data,
            )

        async with Neo4jConnectionFactory.session(database=self.database) as session:
            await session.execute_write(write)

    async def node_degree(self, node_id: str) -> int:
        async with Neo4jConnectionFactory.session(database=self.database) as session:
            result = await session.run(
                f"MATCH (n:{self._label} {{entity_id: $id}}) "
                f"OPTIONAL MATCH (n)-[r]-() RETURN count(r) AS degree",
                id=node_id,
            )
            record = await result.single()
            return int(record["degree"]) if record is not None else 0

    async def drop(self) -> None:
        async with Neo4jConnectionFactory.session(database=self.database) as session:
            await (await session.run(f"MATCH (n:{self._label}) DETACH DELETE n")).consume()


def new_label() -> str:
    return f"Own_{uuid.uuid4().hex[:8]}"


async def test_a_storage_of_ones_own_writes_reads_and_drops(
    configure: Callable[..., Any],
) -> None:
    configure(database="neo4j", pool_max_size=2, pool_min_size=0)
    storage = GraphStorage("team-a", label=new_label())
    await storage.initialize()
    assert storage.database == "neo4j"
    await storage.upsert_node("alice", {"entity_id": "alice", "kind": "person"})
    await storage.upsert_node("acme", {"entity_id": "acme", "kind": "org"})
    await storage.upsert_node("alice", {"entity_id": "alice", "age": 30})  # an update
    await storage.upsert_edge("alice", "acme", {"role": "works at"})
    await storage.upsert_edge("alice", "acme", {"since": 2020})  # the same edge again

    assert await storage.get_node("alice") == {"entity_id": "alice", "kind": "person", "age": 30}
    assert await storage.node_degree("alice") == 1
    assert await storage.node_degree("acme") == 1
    assert await storage.node_degree("nobody") == 0
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert pool.in_use == 0  # the storage holds no lease between calls

    await storage.drop()
    assert await storage.get_node("alice") is None
    assert await storage.node_degree("alice") == 0


async def test_many_tasks_on_one_storage_share_a_small_pool_and_make_one_node_per_id(
    configure: Callable[..., Any],
) -> None:
    configure(database="neo4j", pool_max_size=2, pool_min_size=0)
    storage = GraphStorage("team-b", label=new_label())
    await storage.initialize()
    ids = [f"e{i % 5}" for i in range(40)]
    await asyncio.gather(
        *(storage.upsert_node(entity_id, {"entity_id": entity_id}) for entity_id in ids)
    )
    records, _, _ = await Neo4jConnectionFactory.execute_query(
        f"MATCH (n:{quote_identifier(storage.label)}) RETURN count(n) AS n", database="neo4j"
    )
    assert records[0]["n"] == 5
    stats = (await GlobalNeo4jConnectionPool().get_pool()).stats()
    assert stats["in_use"] == 0
    assert stats["total"] <= 2
    await storage.drop()


async def test_a_storage_that_separates_tenants_by_database_refuses_the_default_one(
    configure: Callable[..., Any], neopool_bolt: BoltTarget
) -> None:
    """ApeRAG's drop() empties the whole database: falling back would wipe every tenant."""
    if neopool_bolt.is_neo4j:
        pytest.skip("whether a database can be created depends on the Neo4j edition")
    configure(database_fallback=False, pool_min_size=0)
    storage = GraphStorage(f"tenant-{uuid.uuid4().hex[:8]}", label=new_label())
    with pytest.raises(MissingDatabase, match="NEOPOOL_DATABASE_FALLBACK"):
        await storage.initialize()
    assert storage.database is None
