"""LightRAG's whole pipeline on PooledNeo4JStorage and on stock Neo4JStorage: the same graph.

``ainsert`` of documents that share entities (chunking, extraction by a
deterministic fake model, merging, graph and vector writes), then ``aquery`` in
``local`` and ``hybrid`` mode. The graph read back from the server, the query
context and the answers must be identical for both storages.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightrag", reason="needs lightrag-hku (pip install 'neopool[lightrag]')")

from neo4j import GraphDatabase

from lightrag import QueryParam
from neopool import GlobalNeo4jConnectionPool
from neopool.database import quote_identifier
from neopool.testing import BoltTarget
from neopool.testing.lightrag_app import documents, make_rag

pytestmark = [pytest.mark.lightrag, pytest.mark.timeout(180)]

QUESTION = "How are Alpha, Charlie and Golf related?"
#: Properties that say when, not what.
VOLATILE = {"created_at"}


def read_graph(
    bolt: BoltTarget, workspace: str, database: str | None
) -> tuple[dict[str, Any], dict[Any, Any]]:
    """``({entity_id: properties}, {frozenset((a, b)): properties})`` of a workspace."""
    label = quote_identifier(workspace)
    with GraphDatabase.driver(bolt.uri, auth=(bolt.username, bolt.password)) as driver:
        records, _, _ = driver.execute_query(
            f"MATCH (n:{label}) RETURN n.entity_id AS id, properties(n) AS p", database_=database
        )
        nodes = {r["id"]: r["p"] for r in records}
        assert len(nodes) == len(records), "duplicate entity_ids"
        records, _, _ = driver.execute_query(
            f"MATCH (a:{label})-[r]->(b:{label}) RETURN a.entity_id AS a, b.entity_id AS b, "
            f"properties(r) AS p",
            database_=database,
        )
        edges = {frozenset((r["a"], r["b"])): r["p"] for r in records}
        assert len(edges) == len(records), "duplicate relations"

    def stable(properties: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in properties.items() if k not in VOLATILE}

    return (
        {k: stable(v) for k, v in nodes.items()},
        {k: stable(v) for k, v in edges.items()},
    )


async def ingest_and_ask(tmp_path: Path, workspace: str, storage: str) -> dict[str, Any]:
    rag = make_rag(str(tmp_path / workspace), workspace, storage)
    await rag.initialize_storages()
    try:
        docs = documents(8)
        await rag.ainsert([text for _, text in docs[:5]], ids=[doc for doc, _ in docs[:5]])
        for doc_id, text in docs[5:]:  # and one at a time, as a task per document would
            await rag.ainsert(text, ids=doc_id)
        answers = {"database": rag.chunk_entity_relation_graph._DATABASE}
        for mode in ("local", "hybrid"):
            answers[mode] = await rag.aquery(
                QUESTION, param=QueryParam(mode=mode, enable_rerank=False)
            )
            answers[f"{mode} context"] = await rag.aquery(
                QUESTION, param=QueryParam(mode=mode, only_need_context=True, enable_rerank=False)
            )
        return answers
    finally:
        await rag.finalize_storages()


async def test_the_pipeline_writes_and_reads_the_same_graph_as_stock(
    neopool_registry: GlobalNeo4jConnectionPool,
    neopool_bolt: BoltTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stock Neo4JStorage reads the environment; PooledNeo4JStorage the registry's config.
    monkeypatch.setenv("NEO4J_URI", neopool_bolt.uri)
    monkeypatch.setenv("NEO4J_USERNAME", neopool_bolt.username)
    monkeypatch.setenv("NEO4J_PASSWORD", neopool_bolt.password)
    if not neopool_bolt.is_neo4j:
        monkeypatch.setenv("NEO4J_DATABASE", "neo4j")  # stock cannot find ArcadeDB's itself
    tag = uuid.uuid4().hex[:8]
    pooled_ws, stock_ws = f"pipeline-pooled-{tag}", f"pipeline-stock-{tag}"

    pooled = await ingest_and_ask(tmp_path, pooled_ws, "PooledNeo4JStorage")
    stock = await ingest_and_ask(tmp_path, stock_ws, "Neo4JStorage")

    pooled_nodes, pooled_edges = read_graph(neopool_bolt, pooled_ws, pooled.pop("database"))
    stock_nodes, stock_edges = read_graph(neopool_bolt, stock_ws, stock.pop("database"))
    assert len(pooled_nodes) >= 10
    assert len(pooled_edges) >= 10
    assert pooled_nodes == stock_nodes
    assert pooled_edges == stock_edges
    assert any(float(p["weight"]) > 1 for p in pooled_edges.values())  # shared between documents
    assert pooled == stock
    for mode in ("local", "hybrid"):
        assert "Alpha" in pooled[f"{mode} context"]
    (pool,) = neopool_registry.pools()
    assert pool.stats()["drivers_created"] == 1
    assert pool.stats()["in_use"] == 0
