"""Helpers of the Celery tests: reading back what the workers wrote."""

from __future__ import annotations

from typing import Any

from neo4j import GraphDatabase

from neopool.celery import cluster_stats
from neopool.config import Neo4jConnectionConfig
from neopool.database import quote_identifier
from neopool.testing.worker_process import CeleryWorkerProcess
from polling import eventually

#: Tasks per run, as the issue asks.
TASKS = 200


def graph_counts(
    config: Neo4jConnectionConfig, database: str | None, workspace: str
) -> tuple[int, int]:
    """``(nodes, relationships)`` in ``workspace``, read with a separate sync driver."""
    label = quote_identifier(workspace)
    with GraphDatabase.driver(config.uri, auth=config.auth()) as driver:
        records, _, _ = driver.execute_query(
            f"MATCH (n:{label}) RETURN count(n) AS c", database_=database
        )
        nodes = records[0]["c"]
        records, _, _ = driver.execute_query(
            f"MATCH (:{label})-[r]->(:{label}) RETURN count(r) AS c", database_=database
        )
        return nodes, records[0]["c"]


def distinct_ids(config: Neo4jConnectionConfig, database: str | None, workspace: str) -> int:
    """How many distinct ``entity_id`` values the workspace holds."""
    label = quote_identifier(workspace)
    with GraphDatabase.driver(config.uri, auth=config.auth()) as driver:
        records, _, _ = driver.execute_query(
            f"MATCH (n:{label}) RETURN count(DISTINCT n.entity_id) AS c", database_=database
        )
        return int(records[0]["c"])


def only_worker(stats: dict[str, Any], worker: CeleryWorkerProcess) -> dict[str, Any]:
    """The one worker's part of ``cluster_stats``: ``{pid: {loop id: stats}}``."""
    assert list(stats) == [worker.nodename], stats
    return dict(stats[worker.nodename])


def settled_stats(
    app: Any, worker: CeleryWorkerProcess, borrows: int, pids: set[str] | None = None
) -> dict[str, Any]:
    """The worker's stats once they count ``borrows`` borrows (in ``pids``, if given).

    A prefork child publishes after each task (``task_postrun``), which runs
    just after the task's result is stored: the last figures may trail it. If
    they never get there within 30 s, the last stats read are returned, for
    the caller's assertions to show.
    """
    latest: dict[str, Any] = {}

    def counted() -> bool:
        latest.clear()
        latest.update(only_worker(cluster_stats(app), worker))
        seen = sum(
            s["borrows"]
            for pid, loops in latest.items()
            if pids is None or pid in pids
            for s in loops.values()
        )
        return seen >= borrows

    eventually(counted, timeout=30)
    return latest
