"""prepare_database: LightRAG's rules, once per process, safe for any workspace name."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.database import database_name_for, effective_workspace, preparer, quote_identifier
from neopool.testing import BoltTarget

pytestmark = pytest.mark.usefixtures("neopool_registry")

HOSTILE_WORKSPACES = [
    "with`backtick",
    "``",
    "quote'single",
    'quote"double',
    "spaces in name",
    "ünïcødé-工作区-🚀",
    "x`) DETACH DELETE n //",
    "}) MATCH (m) DETACH DELETE m //",
    "semi;colon",
    "back\\slash",
]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def prepare(workspace: str | None) -> str | None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        return await borrowed.prepare_database(workspace)


async def test_the_second_call_runs_no_cypher_in_any_loop() -> None:
    workspace = unique("once")
    first = await prepare(workspace)
    statements = preparer.statements_run
    assert await prepare(workspace) == first
    assert await asyncio.to_thread(asyncio.run, prepare(workspace)) == first
    assert preparer.statements_run == statements


async def test_concurrent_first_calls_prepare_once() -> None:
    before = preparer.statements_run
    await prepare(unique("solo"))
    one_preparation = preparer.statements_run - before

    workspace = unique("crowd")
    before = preparer.statements_run
    results = await asyncio.gather(*(prepare(workspace) for _ in range(10)))
    assert len(set(results)) == 1
    assert preparer.statements_run - before == one_preparation


def test_concurrent_first_calls_from_many_threads_prepare_once() -> None:
    GlobalNeo4jConnectionPool.get_config()
    before = preparer.statements_run
    asyncio.run(prepare(unique("solo")))
    one_preparation = preparer.statements_run - before

    workspace = unique("threads")
    barrier = threading.Barrier(4)
    results: list[str | None] = []

    def thread_main() -> None:
        barrier.wait()
        results.append(asyncio.run(prepare(workspace)))

    before = preparer.statements_run
    threads = [threading.Thread(target=thread_main) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert len(set(results)) == 1
    assert preparer.statements_run - before == one_preparation


async def test_a_database_the_server_cannot_create_falls_back_to_the_default(
    neopool_bolt: BoltTarget,
) -> None:
    if neopool_bolt.is_neo4j:
        pytest.skip("whether a database can be created depends on the Neo4j edition")
    database = await prepare(unique("fallback"))
    assert database == "neo4j"


async def test_neo4j_database_is_used_for_every_workspace(neopool_bolt: BoltTarget) -> None:
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(database="neo4j"))
    assert await prepare(unique("a")) == "neo4j"
    assert await prepare(unique("b")) == "neo4j"


async def test_the_workspace_label_gets_an_entity_id_index(neopool_bolt: BoltTarget) -> None:
    workspace = unique("indexed")
    database = await prepare(workspace)
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        records, _, _ = await driver.execute_query("SHOW INDEXES", database_=database)
    indexed = [(r["labelsOrTypes"], r["properties"]) for r in records]
    assert ([workspace], ["entity_id"]) in indexed


@pytest.mark.parametrize("workspace", HOSTILE_WORKSPACES)
async def test_any_workspace_string_is_safe(workspace: str) -> None:
    sentinel = unique("sentinel")
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        await driver.execute_query(
            "CREATE (:NeopoolSentinel {name: $name})", name=sentinel, database_="neo4j"
        )
        database = await borrowed.prepare_database(workspace)
        await driver.execute_query(
            f"MERGE (n:{quote_identifier(workspace)} {{entity_id: $id}})",
            id="e1",
            database_=database,
        )
        records, _, _ = await driver.execute_query(
            f"MATCH (n:{quote_identifier(workspace)}) RETURN labels(n) AS labels",
            database_=database,
        )
        survivors, _, _ = await driver.execute_query(
            "MATCH (s:NeopoolSentinel {name: $name}) RETURN count(s) AS c",
            name=sentinel,
            database_="neo4j",
        )
    assert records[0]["labels"] == [workspace]  # the label is the string itself, intact
    assert survivors[0]["c"] == 1  # nothing was deleted by the name


def test_lightrags_naming_rules() -> None:
    from neopool import Neo4jConnectionConfig

    config = Neo4jConnectionConfig(uri="bolt://h")
    assert effective_workspace(config, None) == "base"
    assert effective_workspace(config, "   ") == "base"
    assert effective_workspace(config, " team ") == "team"
    assert effective_workspace(config.model_copy(update={"workspace": "env"}), "arg") == "env"
    assert database_name_for("my work_space!") == "my-work-space-"
    assert quote_identifier("a`b") == "`a``b`"


async def test_a_database_passed_in_is_used_unless_neo4j_database_is_set(
    neopool_bolt: BoltTarget,
) -> None:
    workspace = unique("explicit")
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        assert await borrowed.prepare_database(workspace, database="neo4j") == "neo4j"
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(database="neo4j"))
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        chosen = await borrowed.prepare_database(unique("env"), database="not-this-one")
    assert chosen == "neo4j"
