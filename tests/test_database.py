"""prepare_database: LightRAG's rules, once per process, safe for any workspace name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from neo4j import AsyncDriver, AsyncGraphDatabase

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, Neo4jConnectionFactory
from neopool.database import database_name_for, effective_workspace, preparer, quote_identifier
from neopool.errors import InvalidName, PrepareTimeout
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
