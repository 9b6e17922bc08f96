"""prepare_database: LightRAG's rules for the database, the caller's schema, once per process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from neo4j import AsyncDriver, AsyncGraphDatabase

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, Neo4jConnectionFactory
from neopool.database import (
    Schema,
    database_name_for,
    effective_workspace,
    preparer,
    quote_identifier,
)
from neopool.errors import InvalidName, MissingDatabase, PrepareTimeout
from neopool.testing import BoltTarget, TcpProxy

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


def open_driver(config: Neo4jConnectionConfig) -> AsyncDriver:
    return AsyncGraphDatabase.driver(config.uri, auth=config.auth(), **config.driver_options())


@contextlib.asynccontextmanager
async def driver_for(config: Neo4jConnectionConfig) -> AsyncIterator[AsyncDriver]:
    driver = open_driver(config)
    try:
        yield driver
    finally:
        await driver.close()


def prepared_for(workspace: str) -> list[str | None]:
    return [database for key, database in preparer.prepared().items() if key[3] == workspace]


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


# -- bounded waits -------------------------------------------------------------------------
@pytest.mark.timing
async def test_a_waiter_gets_prepare_timeout_while_the_preparing_caller_is_stuck(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy
) -> None:
    workspace = unique("stuck")
    settings = {"uri": neopool_proxy.uri(), "database": "neo4j", "connection_timeout": 60.0}
    patient = neopool_bolt.config(**settings, prepare_timeout=60.0)
    hasty = neopool_bolt.config(**settings, prepare_timeout=0.5)
    neopool_proxy.set_blackhole(True)  # accepts the driver's connection, never answers
    async with driver_for(patient) as driver:
        leader = asyncio.create_task(preparer.prepare(driver, patient, workspace))
        waiter = asyncio.create_task(preparer.prepare(driver, hasty, workspace))
        started = time.monotonic()
        with pytest.raises(PrepareTimeout) as raised:
            await waiter
        waited = time.monotonic() - started

        assert 0.45 <= waited < 5.0
        assert isinstance(raised.value, TimeoutError)
        message = str(raised.value)
        assert f"workspace {workspace!r} was still being prepared by another caller" in message
        assert "after 0.5s" in message
        assert "raise prepare_timeout (NEOPOOL_PREPARE_TIMEOUT)" in message
        assert not leader.done()  # the waiter left without cancelling the preparation

        neopool_proxy.set_blackhole(False)
        database = await asyncio.wait_for(leader, 30)
        statements = preparer.statements_run
        assert await preparer.prepare(driver, hasty, workspace) == database == "neo4j"
        assert preparer.statements_run == statements


@pytest.mark.timing
async def test_a_preparation_the_server_never_answers_times_out_and_can_run_again(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy
) -> None:
    workspace = unique("silent")
    settings = {"uri": neopool_proxy.uri(), "database": "neo4j", "connection_timeout": 60.0}
    hasty = neopool_bolt.config(**settings, prepare_timeout=0.5)
    neopool_proxy.set_blackhole(True)
    async with driver_for(hasty) as driver:
        started = time.monotonic()
        with pytest.raises(PrepareTimeout) as raised:
            await preparer.prepare(driver, hasty, workspace)
        assert 0.45 <= time.monotonic() - started < 5.0
        message = str(raised.value)
        assert f"preparing workspace {workspace!r} did not finish within 0.5s" in message
        assert "NEOPOOL_PREPARE_TIMEOUT" in message
        assert prepared_for(workspace) == []

        neopool_proxy.set_blackhole(False)
        patient = neopool_bolt.config(**settings)
        assert await preparer.prepare(driver, patient, workspace) == "neo4j"
    assert prepared_for(workspace) == ["neo4j"]


def _claim_then_stop(
    config: Neo4jConnectionConfig, workspace: str
) -> tuple[asyncio.AbstractEventLoop, AsyncDriver, asyncio.Task[str | None]]:
    """Start preparing on a new loop, then never run that loop again (a blocked thread)."""
    loop = asyncio.new_event_loop()
    driver = open_driver(config)
    leader = loop.create_task(preparer.prepare(driver, config, workspace))
    loop.call_soon(loop.stop)
    loop.run_forever()  # exactly one step of the task: it claims the preparation
    return loop, driver, leader


def _end(
    loop: asyncio.AbstractEventLoop, driver: AsyncDriver, leader: asyncio.Task[str | None]
) -> None:
    """What asyncio.run does at its end: cancel what is left, then close."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(driver.close())
    loop.close()


@pytest.mark.timing
async def test_a_preparation_whose_loop_stopped_is_taken_over_after_its_prepare_timeout(
    neopool_bolt: BoltTarget, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = unique("orphaned")
    stopped = await asyncio.to_thread(
        _claim_then_stop, neopool_bolt.config(database="neo4j", prepare_timeout=0.5), workspace
    )
    patient = neopool_bolt.config(database="neo4j", prepare_timeout=60.0)
    try:
        async with driver_for(patient) as driver:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="neopool"):
                database = await preparer.prepare(driver, patient, workspace)
            elapsed = time.monotonic() - started
        assert not stopped[2].done()  # the first caller is still stuck
    finally:
        await asyncio.to_thread(_end, *stopped)

    assert database == "neo4j"
    assert elapsed < 5.0  # the stuck caller's 0.5 s, not this caller's 60 s
    assert f"preparation of workspace {workspace!r} overran its prepare_timeout" in caplog.text
    assert prepared_for(workspace) == ["neo4j"]  # the old caller's end did not undo it


# -- names the server cannot be sent, and names in the log -------------------------------
@pytest.mark.parametrize(
    ("workspace", "database", "named"),
    [
        ("ws\ud800", None, "workspace 'ws\\ud800' contains a lone surrogate (U+D800 at index 2)"),
        ("plain", "db\udcff", "database 'db\\udcff' contains a lone surrogate (U+DCFF at index 2)"),
    ],
)
async def test_a_name_that_is_not_valid_unicode_is_refused_before_any_cypher(
    workspace: str, database: str | None, named: str
) -> None:
    statements = preparer.statements_run
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        with pytest.raises(InvalidName) as raised:
            await borrowed.prepare_database(workspace, database=database)
    assert isinstance(raised.value, ValueError)
    assert named in str(raised.value)
    assert "pass valid Unicode" in str(raised.value)
    assert preparer.statements_run == statements


def test_lightrags_naming_rules_refuse_names_that_are_not_valid_unicode() -> None:
    config = Neo4jConnectionConfig(uri="bolt://h")
    with pytest.raises(InvalidName, match="lone surrogate"):
        effective_workspace(config, "ws\ud800")
    with pytest.raises(InvalidName, match="lone surrogate"):
        database_name_for("ws\ud800")


async def test_names_are_logged_quoted_and_cut_short(caplog: pytest.LogCaptureFixture) -> None:
    workspace = unique("forged\nneopool: all good ") + "x" * 500
    with caplog.at_level(logging.INFO, logger="neopool"):
        await prepare(workspace)
    messages = [record.getMessage() for record in caplog.records if record.name == "neopool"]
    assert any("prepared in database" in message for message in messages)
    for message in messages:
        assert "\n" not in message  # a name cannot start a forged log line
        assert "x" * 100 not in message
    assert any(repr(workspace[:60]) in message for message in messages)
    assert any(f"…({len(workspace)} characters)" in message for message in messages)


# -- the schema is the caller's --------------------------------------------------------------
async def schema_on(label: str, database: str | None) -> tuple[list[list[str]], list[list[str]]]:
    """(properties with a uniqueness constraint, properties with any index) on ``label``."""
    constraints, _, _ = await Neo4jConnectionFactory.execute_query(
        "SHOW CONSTRAINTS", database=database
    )
    indexes, _, _ = await Neo4jConnectionFactory.execute_query("SHOW INDEXES", database=database)
    unique = [
        list(c["properties"])
        for c in constraints
        if c["labelsOrTypes"] == [label] and c["type"] in ("UNIQUENESS", "NODE_PROPERTY_UNIQUENESS")
    ]
    indexed = [list(i["properties"]) for i in indexes if i["labelsOrTypes"] == [label]]
    return unique, indexed


async def test_a_plain_index_on_a_label_and_key_of_the_callers_choice() -> None:
    workspace, label = unique("tenant"), unique("Node")
    database = await Neo4jConnectionFactory.prepare_database(
        workspace, "neo4j", schema=Schema.index(label=label, key="node_id")
    )
    assert await schema_on(label, database) == ([], [["node_id"]])
    assert await schema_on(workspace, database) == ([], [])  # the workspace label is untouched


async def test_a_uniqueness_constraint_on_a_label_of_the_callers_choice() -> None:
    workspace, label = unique("tenant"), unique("Shared")
    database = await Neo4jConnectionFactory.prepare_database(
        workspace, "neo4j", schema=Schema.unique(label=label)
    )
    unique_keys, indexed = await schema_on(label, database)
    assert unique_keys == [["entity_id"]]
    assert ["entity_id"] in indexed
    assert preparer.unique_keys[(database, label, "entity_id")] is True
    assert await schema_on(workspace, database) == ([], [])


async def test_no_schema_creates_nothing() -> None:
    workspace = unique("bare")
    statements = preparer.statements_run
    database = await Neo4jConnectionFactory.prepare_database(workspace, "neo4j", schema=None)
    assert await schema_on(workspace, database) == ([], [])
    assert preparer.statements_run - statements == 1  # the database probe only


async def test_an_index_schema_keeps_an_existing_plain_index_and_adds_no_constraint() -> None:
    label = unique("Indexed")
    await Neo4jConnectionFactory.execute_query(
        f"CREATE INDEX {quote_identifier(label + '_own')} IF NOT EXISTS "
        f"FOR (n:{quote_identifier(label)}) ON (n.entity_id)",
        database="neo4j",
    )
    before = await schema_on(label, "neo4j")
    await Neo4jConnectionFactory.prepare_database(
        unique("ws"), "neo4j", schema=Schema.index(label=label)
    )
    assert await schema_on(label, "neo4j") == before == ([], [["entity_id"]])


async def test_the_schema_is_part_of_what_is_cached() -> None:
    workspace = unique("twice")
    await Neo4jConnectionFactory.prepare_database(workspace, "neo4j", schema=None)
    statements = preparer.statements_run
    await Neo4jConnectionFactory.prepare_database(workspace, "neo4j", schema=Schema.index())
    assert preparer.statements_run > statements  # a new choice is prepared, not served cached
    assert await schema_on(workspace, "neo4j") == ([], [["entity_id"]])
    statements = preparer.statements_run
    await Neo4jConnectionFactory.prepare_database(workspace, "neo4j", schema=Schema.index())
    assert preparer.statements_run == statements


async def test_the_log_line_says_what_was_created_on_which_label_in_which_database(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workspace, label = unique("logged"), unique("Node")
    with caplog.at_level(logging.INFO, logger="neopool"):
        await Neo4jConnectionFactory.prepare_database(
            workspace, "neo4j", schema=Schema.index(label=label, key="node_id")
        )
        await Neo4jConnectionFactory.prepare_database(unique("nothing"), "neo4j", schema=None)
    messages = [r.getMessage() for r in caplog.records if "prepared in database" in r.getMessage()]
    assert messages[0] == (
        f"neopool: workspace {workspace!r} prepared in database 'neo4j': "
        f"index on :`{label}`(`node_id`)"
    )
    assert messages[1].endswith("prepared in database 'neo4j': no schema asked for")


def test_a_schema_refuses_what_it_cannot_create() -> None:
    with pytest.raises(ValueError, match="Schema kind 'unique'"):
        Schema("unique")  # type: ignore[arg-type]
    with pytest.raises(InvalidName, match="label is empty"):
        Schema.index(label=" ")
    with pytest.raises(InvalidName, match="lone surrogate"):
        Schema.unique(key="k\ud800")


async def test_on_neo4j_a_plain_index_is_replaced_only_when_the_constraint_is_asked_for(
    neopool_bolt: BoltTarget,
) -> None:
    """Neo4j refuses a constraint where a plain index covers the key; ArcadeDB does not."""
    if not neopool_bolt.is_neo4j:
        pytest.skip("only Neo4j refuses a constraint over a plain index (NEOPOOL_TEST_NEO4J_URI)")
    label = unique("Legacy")
    await Neo4jConnectionFactory.execute_query(
        f"CREATE INDEX IF NOT EXISTS FOR (n:{quote_identifier(label)}) ON (n.entity_id)",
        database="neo4j",
    )
    await Neo4jConnectionFactory.prepare_database(
        unique("a"), "neo4j", schema=Schema.index(label=label)
    )
    assert await schema_on(label, "neo4j") == ([], [["entity_id"]])
    await Neo4jConnectionFactory.prepare_database(
        unique("b"), "neo4j", schema=Schema.unique(label=label)
    )
    unique_keys, indexed = await schema_on(label, "neo4j")
    assert unique_keys == [["entity_id"]]
    assert indexed == [["entity_id"]]  # the constraint's own index only


# -- database_fallback -----------------------------------------------------------------------
async def test_without_the_fallback_a_database_that_cannot_be_created_is_an_error(
    neopool_bolt: BoltTarget, caplog: pytest.LogCaptureFixture
) -> None:
    if neopool_bolt.is_neo4j:
        pytest.skip("whether a database can be created depends on the Neo4j edition")
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(database_fallback=False))
    workspace = unique("tenant")
    before = await schema_on(workspace, "neo4j")
    statements = preparer.statements_run
    with (
        caplog.at_level(logging.WARNING, logger="neopool"),
        pytest.raises(MissingDatabase) as raised,
    ):
        await Neo4jConnectionFactory.prepare_database(workspace)
    message = str(raised.value)
    assert raised.value.database == database_name_for(workspace)
    assert f"database {database_name_for(workspace)!r} does not exist" in message
    assert "database_fallback is off (NEOPOOL_DATABASE_FALLBACK=false)" in message
    assert preparer.statements_run - statements == 2  # the probe and CREATE DATABASE, no more
    assert await schema_on(workspace, "neo4j") == before == ([], [])  # nothing written
    assert prepared_for(workspace) == []  # not cached: a later call tries again
    assert "using the default database" not in caplog.text
    copy = pickle.loads(pickle.dumps(raised.value))  # as Celery sends a task's error back
    assert (str(copy), copy.database) == (message, raised.value.database)
