"""PooledNeo4JStorage: LightRAG's Neo4j storage whose sessions borrow from the loop's pool."""

from __future__ import annotations

import asyncio
import configparser
import gc
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")

pytest.importorskip("numpy", reason="needs numpy (a dependency of lightrag-hku)")

import numpy as np
from lightrag.kg import neo4j_impl
from lightrag.kg.neo4j_impl import Neo4JStorage
from neo4j.exceptions import ServiceUnavailable

import neopool
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.database import preparer
from neopool.errors import ConfigError
from neopool.integrations.lightrag import (
    LeasedDriver,
    PooledNeo4JStorage,
    lightrag_config,
    lost_races_retried,
    register,
)
from neopool.testing import BoltTarget, reset_registry
from neopool.testing.lightrag_app import CharacterTokenizer, documents, make_rag
from polling import eventually_async

pytestmark = [pytest.mark.lightrag, pytest.mark.timeout(120)]


async def _embed(texts: list[str]) -> Any:
    return np.zeros((len(texts), 8), dtype=np.float32)


def new_workspace(prefix: str = "lightrag") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def workspace() -> str:
    return new_workspace()


@pytest.fixture
def storage_factory(neopool_registry: GlobalNeo4jConnectionPool, workspace: str) -> Any:
    def make(workspace: str = workspace) -> PooledNeo4JStorage:
        return PooledNeo4JStorage(
            namespace="chunk_entity_relation",
            global_config={"working_dir": "."},
            embedding_func=None,
            workspace=workspace,
        )

    return make


def node(entity_id: str, **extra: str) -> dict[str, str]:
    return {"entity_id": entity_id, "entity_type": "concept", "description": entity_id, **extra}


def the_pool(registry: GlobalNeo4jConnectionPool) -> neopool.EventLoopConnectionPool:
    (pool,) = registry.pools()
    return pool


async def test_every_graph_operation_works(storage_factory: Any) -> None:
    storage = storage_factory()
    await storage.initialize()
    try:
        await storage.upsert_node("A", node("A"))
        await storage.upsert_node("B", node("B"))
        await storage.upsert_nodes_batch([("C", node("C")), ("D", node("D"))])
        await storage.upsert_edge("A", "B", {"weight": "1.0", "description": "a-b"})
        await storage.upsert_edges_batch(
            [("B", "C", {"weight": "2.0"}), ("C", "D", {"weight": "3.0"})]
        )

        assert await storage.has_node("A")
        assert not await storage.has_node("nope")
        assert await storage.has_nodes_batch(["A", "D", "nope"]) == {"A", "D"}
        assert (await storage.get_node("A"))["entity_id"] == "A"
        assert await storage.get_node("nope") is None
        assert set(await storage.get_nodes_batch(["A", "B"])) == {"A", "B"}
        assert await storage.has_edge("A", "B")
        assert await storage.has_edge("B", "A")  # LightRAG edges are undirected
        assert not await storage.has_edge("A", "D")
        assert await storage.node_degree("B") == 2
        assert await storage.node_degrees_batch(["A", "B"]) == {"A": 1, "B": 2}
        assert await storage.edge_degree("A", "B") == 3
        assert await storage.edge_degrees_batch([("A", "B")]) == {("A", "B"): 3}
        assert (await storage.get_edge("A", "B"))["description"] == "a-b"
        assert await storage.get_edge("A", "D") is None
        batch = await storage.get_edges_batch([{"src": "B", "tgt": "C"}])
        assert float(batch[("B", "C")]["weight"]) == 2.0
        assert sorted(map(sorted, await storage.get_node_edges("B"))) == [["A", "B"], ["B", "C"]]
        assert set(await storage.get_nodes_edges_batch(["A", "C"])) == {"A", "C"}
        assert set(await storage.get_all_labels()) == {"A", "B", "C", "D"}

        await storage.remove_edges([("C", "D")])
        assert not await storage.has_edge("C", "D")
        await storage.delete_node("D")
        assert not await storage.has_node("D")
        await storage.remove_nodes(["C"])
        assert await storage.has_nodes_batch(["A", "B", "C"]) == {"A", "B"}

        assert (await storage.drop())["status"] == "success"
        assert not await storage.has_node("A")
    finally:
        await storage.finalize()


async def test_a_lease_is_held_per_session_not_per_storage(
    storage_factory: Any, neopool_registry: GlobalNeo4jConnectionPool
) -> None:
    storage = storage_factory()
    await storage.initialize()
    pool = the_pool(neopool_registry)
    assert pool.in_use == 0  # initialised, and holding nothing
    async with storage._driver.session(database=storage._DATABASE) as session:
        assert pool.in_use == 1
        await (await session.run("RETURN 1")).consume()
        async with storage._driver.session(database=storage._DATABASE):
            assert pool.in_use == 1  # a session inside a session of one task shares its lease
    assert pool.in_use == 0

    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with storage._driver.session(database=storage._DATABASE):
            entered.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(3)]
    await entered.wait()
    assert await eventually_async(lambda: pool.in_use == 3)  # tasks do not share
    release.set()
    await asyncio.gather(*holders)
    assert pool.in_use == 0
    await storage.finalize()
    await storage.finalize()  # LightRAG may finalize twice: harmless


@pytest.mark.filterwarnings("ignore:`id` is deprecated:DeprecationWarning")  # LightRAG's code
async def test_a_query_inside_a_session_never_waits_for_its_own_task(
    storage_factory: Any, configure: Any
) -> None:
    """As LightRAG's get_knowledge_graph does when APOC is missing (_robust_fallback)."""
    configure(pool_max_size=1, pool_min_size=1, borrow_timeout=5)
    storage = storage_factory()
    await storage.initialize()
    try:
        await storage.upsert_nodes_batch([("A", node("A")), ("B", node("B"))])
        await storage.upsert_edge("A", "B", {"weight": "1.0"})
        async with storage._driver.session(database=storage._DATABASE):
            assert await asyncio.wait_for(storage.has_node("A"), 10)  # the one lease, shared
            fallback = await asyncio.wait_for(storage._robust_fallback("A", 2, 10), 10)
        assert {n.id for n in fallback.nodes} == {"A", "B"}
        graph = await storage.get_knowledge_graph("A", max_depth=2)
        assert {n.labels[0] for n in graph.nodes} == {"A", "B"}
    finally:
        await storage.drop()
        await storage.finalize()


async def test_a_hundred_live_storages_share_one_loop_at_default_settings(
    storage_factory: Any, neopool_registry: GlobalNeo4jConnectionPool
) -> None:
    storages = [storage_factory(new_workspace("hundred")) for _ in range(100)]
    await asyncio.gather(*(s.initialize() for s in storages))
    pool = the_pool(neopool_registry)
    assert pool.max_size == 10  # the default: it bounds sessions, not storages
    assert pool.in_use == 0

    async def use(i: int, storage: PooledNeo4JStorage) -> bool:
        await storage.upsert_node(f"e{i}", node(f"e{i}"))
        return bool(await storage.has_node(f"e{i}"))

    assert all(await asyncio.gather(*(use(i, s) for i, s in enumerate(storages))))
    stats = pool.stats()
    assert stats["total"] <= 10  # never more leases than pool_max_size
    assert stats["timeouts"] == 0
    assert stats["drivers_created"] == 1
    assert stats["in_use"] == 0
    assert await storages[7].has_node("e7")
    assert not await storages[7].has_node("e8")  # each its own workspace
    await asyncio.gather(*(s.drop() for s in storages))
    await asyncio.gather(*(s.finalize() for s in storages))
    assert pool.stats()["in_use"] == 0


@pytest.mark.timing
async def test_storages_dropped_after_a_crash_give_back_everything_with_one_warning(
    storage_factory: Any,
    neopool_registry: GlobalNeo4jConnectionPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """30 tasks crash before finalize; 10 more are destroyed mid-session, holding every lease."""

    async def crashes(storage: PooledNeo4JStorage) -> None:
        await storage.initialize()
        await storage.upsert_node("A", node("A"))
        raise RuntimeError("the task failed before finalize_storages()")

    async def stuck(storage: PooledNeo4JStorage, entered: list[int]) -> None:
        await storage.initialize()
        async with storage._driver.session(database=storage._DATABASE):
            entered.append(1)
            await asyncio.get_running_loop().create_future()  # nothing ever resolves it

    crashed = await asyncio.gather(
        *(crashes(storage_factory()) for _ in range(30)), return_exceptions=True
    )
    assert all(isinstance(result, RuntimeError) for result in crashed)
    pool = the_pool(neopool_registry)
    entered: list[int] = []
    tasks = {asyncio.create_task(stuck(storage_factory(), entered)) for _ in range(10)}
    assert await eventually_async(lambda: len(entered) == 10)
    assert pool.in_use == pool.max_size == 10  # the pool is exhausted by tasks that will die
    del tasks, crashed
    caplog.set_level(logging.WARNING, logger="neopool")
    gc.collect()  # the tasks were only referenced by themselves: destroyed while pending
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert await eventually_async(lambda: pool.in_use == 0)  # every lease is back

    started = time.monotonic()
    fresh = storage_factory()
    await fresh.initialize()
    await fresh.upsert_node("B", node("B"))
    assert time.monotonic() - started < 2  # at once, not after borrow_timeout (30 s)
    assert pool.in_use == 0
    dropped = [r.getMessage() for r in caplog.records if "garbage-collected" in r.getMessage()]
    assert len(dropped) == 1, dropped
    assert "40 PooledNeo4JStorage instance(s) without finalize()" in dropped[0]
    assert "10 session(s) still open" in dropped[0]
    assert __file__ in dropped[0]  # where they were initialised
    assert not [r for r in caplog.records if "was never returned" in r.getMessage()]
    assert not [r for r in caplog.records if "still in use" in r.getMessage()]
    await fresh.drop()
    await fresh.finalize()


async def test_lightrag_accepts_the_registered_storage_name(
    neopool_registry: GlobalNeo4jConnectionPool, workspace: str, tmp_path: Path
) -> None:
    from lightrag.utils import EmbeddingFunc, Tokenizer

    from lightrag import LightRAG

    async def no_llm(*args: Any, **kwargs: Any) -> str:
        return ""

    register()
    register()  # idempotent
    rag = LightRAG(
        working_dir=str(tmp_path),
        workspace=workspace,
        graph_storage="PooledNeo4JStorage",
        embedding_func=EmbeddingFunc(embedding_dim=8, max_token_size=512, func=_embed),
        llm_model_func=no_llm,
        tokenizer=Tokenizer("characters", CharacterTokenizer()),  # no tiktoken download
    )
    await rag.initialize_storages()
    try:
        graph = rag.chunk_entity_relation_graph
        assert isinstance(graph, PooledNeo4JStorage)
        assert isinstance(graph._driver, LeasedDriver)
        await graph.upsert_node("X", node("X"))
        assert await graph.has_node("X")
        pool = the_pool(neopool_registry)
        assert pool.stats()["in_use"] == 0
        await graph.drop()
    finally:
        await rag.finalize_storages()
    assert graph._driver is None
    assert pool.stats()["in_use"] == 0
    assert pool.stats()["drivers_created"] == 1


class NoteStorage(Neo4JStorage):  # type: ignore[misc]
    """The design note's pattern, as a user writes it: a lease from initialize to finalize."""

    async def initialize(self) -> None:
        self._borrowed_connection = Neo4jConnectionFactory.borrow_connection()
        await self._borrowed_connection.__aenter__()
        self._driver = await self._borrowed_connection.get_driver()
        self._DATABASE = await self._borrowed_connection.prepare_database(self.workspace)

    async def finalize(self) -> None:
        if self._borrowed_connection:
            await self._borrowed_connection.__aexit__(None, None, None)
            self._borrowed_connection = None
        self._driver = None


async def test_the_notes_own_pattern_keeps_working(
    neopool_registry: GlobalNeo4jConnectionPool, workspace: str
) -> None:
    storage = NoteStorage(
        namespace="chunk_entity_relation",
        global_config={"working_dir": "."},
        embedding_func=None,
        workspace=workspace,
    )
    await storage.initialize()
    pool = the_pool(neopool_registry)
    assert pool.in_use == 1  # the user chose to hold it: their storage, their lease
    await storage.upsert_node("N", node("N"))
    assert await storage.has_node("N")
    await storage.drop()
    await storage.finalize()
    assert pool.in_use == 0


async def test_a_write_that_loses_the_race_for_an_entity_is_run_again(
    storage_factory: Any,
) -> None:
    storage = storage_factory()
    await storage.initialize()
    try:
        assert preparer.unique_keys[(storage._DATABASE, storage.workspace, "entity_id")]
        await storage.upsert_node("taken", node("taken"))
        label = storage._get_workspace_label()
        attempts: list[str] = []

        async def write(tx: Any) -> None:
            # The first attempt behaves as a MERGE that found nothing and creates the node
            # the other process has just created: the constraint refuses it.
            verb = "CREATE" if not attempts else "MERGE"
            attempts.append(verb)
            query = f"{verb} (n:`{label}` {{entity_id: 'taken'}}) SET n.description = 'mine'"
            await (await tx.run(query)).consume()

        lost = lost_races_retried()
        async with storage._driver.session(database=storage._DATABASE) as session:
            await session.execute_write(write)
        assert attempts == ["CREATE", "MERGE"]
        assert lost_races_retried() == lost + 1
        assert (await storage.get_node("taken"))["description"] == "mine"
        assert len(await storage.get_all_nodes()) == 1
    finally:
        await storage.drop()
        await storage.finalize()


async def test_concurrent_merges_of_the_same_new_entities_neither_fail_nor_duplicate(
    storage_factory: Any,
) -> None:
    storages = [storage_factory() for _ in range(4)]
    await asyncio.gather(*(s.initialize() for s in storages))
    ids = [f"shared-{i}" for i in range(8)]
    try:
        await asyncio.gather(
            *(
                storages[i % 4].upsert_nodes_batch([(e, node(e)) for e in ids[i % 3 :]])
                for i in range(24)
            )
        )
        nodes = await storages[0].get_all_nodes()
        assert sorted(n["entity_id"] for n in nodes) == sorted(ids)
    finally:
        await storages[0].drop()
        await asyncio.gather(*(s.finalize() for s in storages))


async def test_the_full_text_index_is_tried_again_after_a_failure(
    storage_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = Neo4JStorage._create_fulltext_index

    async def flaky(self: Any, driver: Any, database: Any, label: str) -> None:
        if not calls:
            calls.append("failed")
            try:  # as LightRAG's own method does: the failure is logged, not raised
                async with driver.session(database=database):
                    raise ServiceUnavailable("the server went away")
            except Exception:
                return
        calls.append("real")
        await original(self, driver, database, label)

    monkeypatch.setattr(Neo4JStorage, "_create_fulltext_index", flaky)
    for _ in range(3):
        storage = storage_factory()
        await storage.initialize()
        await storage.finalize()
    # The network failure is tried again by the next storage; the real attempt then
    # settles it (ArcadeDB refuses full-text indexes; Neo4j creates it): never again.
    assert calls == ["failed", "real"]


def server_in_config_ini(
    monkeypatch: pytest.MonkeyPatch, target: BoltTarget, **settings: str
) -> None:
    """LightRAG's ``config.ini`` names ``target`` (and ``settings``) in its ``[neo4j]`` section.

    No ``NEO4J_URI``, ``NEO4J_USERNAME`` or ``NEO4J_PASSWORD`` in the environment says otherwise.
    """
    server = {"uri": target.uri, "username": target.username, "password": target.password}
    ini = configparser.ConfigParser()
    ini.read_dict({"neo4j": {**server, **settings}})
    monkeypatch.setattr(neo4j_impl, "config", ini)
    for name in ("NEO4J_URI", "NEO4J_USERNAME", "NEO4J_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_config_ini_is_read_as_stock_reads_it(
    monkeypatch: pytest.MonkeyPatch, neopool_bolt: BoltTarget
) -> None:
    server_in_config_ini(monkeypatch, neopool_bolt, connection_pool_size="33", keep_alive="false")
    monkeypatch.delenv("NEO4J_KEEP_ALIVE", raising=False)
    monkeypatch.setenv("NEO4J_MAX_CONNECTION_POOL_SIZE", "44")  # the environment wins
    config = lightrag_config()
    assert config.uri == neopool_bolt.uri
    assert config.password.get_secret_value() == neopool_bolt.password
    assert config.max_connection_pool_size == 44
    assert config.keep_alive is False
    assert lightrag_config(pool_max_size=3).pool_max_size == 3

    monkeypatch.setattr(neo4j_impl, "config", configparser.ConfigParser())
    with pytest.raises(ConfigError, match="NEO4J_URI"):
        lightrag_config()  # neither: the same error as without LightRAG


def test_a_storage_connects_with_config_ini_alone(
    monkeypatch: pytest.MonkeyPatch, neopool_bolt: BoltTarget, workspace: str
) -> None:
    server_in_config_ini(monkeypatch, neopool_bolt)
    reset_registry()  # no configuration set: the storage finds LightRAG's

    async def use() -> bool:
        storage = PooledNeo4JStorage("chunk_entity_relation", {}, None, workspace)
        await storage.initialize()
        try:
            await storage.upsert_node("I", node("I"))
            found = bool(await storage.has_node("I"))
            await storage.drop()
            return found
        finally:
            await storage.finalize()

    try:
        assert asyncio.run(use())
        assert GlobalNeo4jConnectionPool.get_config().uri == neopool_bolt.uri
    finally:
        reset_registry()


def test_a_configuration_the_application_set_wins_over_config_ini(
    monkeypatch: pytest.MonkeyPatch, configure: Any, neopool_bolt: BoltTarget, workspace: str
) -> None:
    server_in_config_ini(monkeypatch, neopool_bolt, connection_pool_size="33")
    configure(max_connection_pool_size=7, pool_max_size=7)

    async def use() -> int:
        storage = PooledNeo4JStorage("chunk_entity_relation", {}, None, workspace)
        await storage.initialize()
        await storage.finalize()
        return (await GlobalNeo4jConnectionPool().get_pool()).config.max_connection_pool_size

    assert asyncio.run(use()) == 7
    assert GlobalNeo4jConnectionPool.get_config().max_connection_pool_size == 7


def test_a_call_leaves_no_lightrag_task_behind_and_detached_is_the_opt_out(
    neopool_registry: GlobalNeo4jConnectionPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-task LightRAG on the persistent loop: nothing stays; a held one may opt out."""

    async def alive() -> int:
        return len(asyncio.all_tasks()) - 1

    workspace = new_workspace("calls")
    docs = documents(4)
    try:
        for doc_id, text in docs[:2]:

            async def task(doc_id: str = doc_id, text: str = text) -> int:
                rag = make_rag(str(tmp_path / "per-task"), workspace)
                await rag.initialize_storages()
                try:
                    await rag.ainsert(text, ids=doc_id)
                finally:
                    await rag.finalize_storages()
                return await alive()

            assert neopool.run(task()) > 0  # LightRAG's queue workers and health checks
            assert neopool.run(alive()) == 0  # ... cancelled when the call returned

        held = make_rag(str(tmp_path / "held"), workspace)
        neopool.run(held.initialize_storages())

        async def insert_detached(doc_id: str, text: str) -> int:
            with neopool.runner.detached():
                await held.ainsert(text, ids=doc_id)
            return await alive()

        caplog.set_level(logging.WARNING)
        left = neopool.run(insert_detached(*docs[2]))
        assert left > 0
        assert neopool.run(alive()) == left  # kept, by request
        neopool.run(insert_detached(*docs[3]))
        assert not [r for r in caplog.records if "Reinitializing" in r.getMessage()]
        neopool.run(held.finalize_storages())
    finally:
        neopool.runner.close_thread_loop()  # cancels what was kept


def test_a_session_dropped_in_a_forked_child_sends_nothing_to_the_parents_loop() -> None:
    """A held lease collected in a child of ``fork`` (its pool's ``pid`` the parent's) is
    not given back through the loop: that loop's wake-up pipe is the parent's (server-free)."""
    from types import SimpleNamespace

    from neopool.integrations import lightrag

    sent: list[object] = []

    class ParentsLoop:
        def is_closed(self) -> bool:
            return False

        def call_soon_threadsafe(self, callback: object, *args: object) -> None:
            sent.append(callback)

    pool = SimpleNamespace(loop=ParentsLoop(), pid=-1)  # made in another process
    pending = len(lightrag._dropped.pending)
    lightrag._session_dropped(SimpleNamespace(pool=pool), None)  # type: ignore[arg-type]
    assert sent == []
    assert len(lightrag._dropped.pending) == pending + 1  # the next initialise reports it
    lightrag._dropped.pending.pop()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_counts_its_own_lost_races_and_drops() -> None:
    """What the parent counted (or has still to report) is not the child's (server-free)."""
    import os

    from neopool.integrations import lightrag

    lightrag._races.lost += 3
    lightrag._dropped.pending.append(("session", None))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        fresh = lost_races_retried() == 0 and not lightrag._dropped.pending
        os.write(write, b"1" if fresh else b"0")
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as answer:
            assert answer.read() == b"1"
    finally:
        os.waitpid(pid, 0)
        lightrag._races.lost -= 3
        lightrag._dropped.pending.pop()
