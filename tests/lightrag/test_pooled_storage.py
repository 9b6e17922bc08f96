"""PooledNeo4JStorage: LightRAG's Neo4j storage on a borrowed, pooled driver."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")

import numpy as np

from neopool import GlobalNeo4jConnectionPool
from neopool.database import preparer
from neopool.integrations.lightrag import PooledNeo4JStorage, register
from neopool.testing import BoltTarget

pytestmark = [pytest.mark.lightrag, pytest.mark.timeout(120)]


async def _embed(texts: list[str]) -> Any:
    return np.zeros((len(texts), 8), dtype=np.float32)


@pytest.fixture
def workspace() -> str:
    return f"lightrag-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def storage_factory(neopool_registry: GlobalNeo4jConnectionPool, workspace: str) -> Any:
    def make() -> PooledNeo4JStorage:
        return PooledNeo4JStorage(
            namespace="chunk_entity_relation",
            global_config={"working_dir": "."},
            embedding_func=None,
            workspace=workspace,
        )

    return make


class _Characters:
    """A tokenizer that needs no download: one token per character."""

    def encode(self, content: str) -> list[int]:
        return [ord(c) for c in content]

    def decode(self, tokens: list[int]) -> str:
        return "".join(map(chr, tokens))


def node(entity_id: str, **extra: str) -> dict[str, str]:
    return {"entity_id": entity_id, "entity_type": "concept", "description": entity_id, **extra}


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


async def test_twenty_storages_in_one_loop_share_one_driver(
    storage_factory: Any, neopool_registry: GlobalNeo4jConnectionPool, neopool_bolt: BoltTarget
) -> None:
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(pool_max_size=32))
    storages = [storage_factory() for _ in range(20)]
    await asyncio.gather(*(s.initialize() for s in storages))
    statements = preparer.statements_run
    (pool,) = neopool_registry.pools()
    assert pool.stats()["in_use"] == 20  # each holds its borrowed connection
    assert len({id(s._driver) for s in storages}) == 1
    assert {s._DATABASE for s in storages} == {storages[0]._DATABASE}
    await storages[0].upsert_node("shared", node("shared"))
    assert await storages[19].has_node("shared")

    await asyncio.gather(*(s.finalize() for s in storages))
    assert pool.stats()["in_use"] == 0
    assert pool.stats()["drivers_created"] == 1
    assert pool.stats()["borrows"] == 20
    assert storages[0]._driver is None

    again = storage_factory()  # a later storage: no preparation Cypher, same driver
    await again.initialize()
    assert preparer.statements_run == statements
    assert again._driver is pool.driver
    await again.drop()
    await again.finalize()
    await again.finalize()  # LightRAG may finalize twice: harmless


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
        tokenizer=Tokenizer("characters", _Characters()),  # no tiktoken download
    )
    await rag.initialize_storages()
    try:
        graph = rag.chunk_entity_relation_graph
        assert isinstance(graph, PooledNeo4JStorage)
        await graph.upsert_node("X", node("X"))
        assert await graph.has_node("X")
        (pool,) = neopool_registry.pools()
        assert pool.stats()["in_use"] == 1
        await graph.drop()
    finally:
        await rag.finalize_storages()
    assert pool.stats()["in_use"] == 0
