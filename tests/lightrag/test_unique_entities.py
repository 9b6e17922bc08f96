"""prepare_database makes entity_id unique on the workspace label, where the data allows it.

Without that, two processes that MERGE the same new entity at once can both
create it (LightRAG's locks do not span processes). These tests need no
LightRAG: they are about what ``prepare_database`` leaves on the server.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from neo4j.exceptions import ConstraintError

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.database import preparer, quote_identifier

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _one_database(configure: Any) -> None:
    """Every workspace in database ``neo4j``, where these tests write their set-up too."""
    configure(database="neo4j")


def new_workspace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def run(query: str, database: str | None = "neo4j") -> list[dict[str, Any]]:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query(query, database_=database)
        return [record.data() for record in records]


async def schema(workspace: str, database: str | None) -> tuple[bool, bool]:
    """(a uniqueness constraint on entity_id, an index on entity_id) for the label."""
    constraints = await run("SHOW CONSTRAINTS", database)
    unique = any(
        c["labelsOrTypes"] == [workspace]
        and c["properties"] == ["entity_id"]
        and c["type"] in ("UNIQUENESS", "NODE_PROPERTY_UNIQUENESS")
        for c in constraints
    )
    indexes = await run("SHOW INDEXES", database)
    indexed = any(
        i["labelsOrTypes"] == [workspace] and i["properties"] == ["entity_id"] for i in indexes
    )
    return unique, indexed


async def prepare(workspace: str) -> str | None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        return await borrowed.prepare_database(workspace)


async def test_a_new_workspace_gets_a_uniqueness_constraint(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    workspace = new_workspace("unique")
    database = await prepare(workspace)
    assert await schema(workspace, database) == (True, True)
    assert preparer.unique_keys[(database, workspace, "entity_id")] is True
    label = quote_identifier(workspace)
    await run(f"CREATE (:{label} {{entity_id: 'x'}})", database)
    with pytest.raises(ConstraintError):
        await run(f"CREATE (:{label} {{entity_id: 'x'}})", database)


async def test_a_workspace_with_lightrags_plain_index_gets_the_constraint_too(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    """What stock Neo4JStorage (or an older neopool) left: the plain index, and data."""
    workspace = new_workspace("indexed")
    label = quote_identifier(workspace)
    await run(f"CREATE INDEX IF NOT EXISTS FOR (n:{label}) ON (n.entity_id)")
    await run(f"UNWIND range(1, 5) AS i CREATE (:{label} {{entity_id: 'e' + toString(i)}})")
    database = await prepare(workspace)
    assert await schema(workspace, database) == (True, True)
    assert preparer.unique_keys[(database, workspace, "entity_id")] is True


async def test_existing_duplicates_keep_the_index_and_are_counted_in_one_warning(
    neopool_registry: GlobalNeo4jConnectionPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    workspace = new_workspace("duplicated")
    label = quote_identifier(workspace)
    # Three ids with two extra copies between them, as concurrent writers left them.
    await run(
        f"UNWIND ['a', 'a', 'a', 'b', 'b', 'c', 'd'] AS id CREATE (:{label} {{entity_id: id}})"
    )
    caplog.set_level(logging.WARNING, logger="neopool")
    database = await prepare(workspace)
    assert await schema(workspace, database) == (False, True)
    assert preparer.unique_keys[(database, workspace, "entity_id")] is False
    warnings = [
        r.getMessage() for r in caplog.records if "entity_id is not unique" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "2 entity_id value(s) have more than one node (3 extra node(s))" in warnings[0]
    assert f"CREATE CONSTRAINT IF NOT EXISTS FOR (n:{label})" in warnings[0]  # the fix
    caplog.clear()
    await prepare(workspace)  # cached: said once per process
    assert not [r for r in caplog.records if "entity_id is not unique" in r.getMessage()]
    await run(f"MATCH (n:{label}) DETACH DELETE n", database)
