"""Helpers of the Celery tests: reading back what the workers wrote."""

from __future__ import annotations

from neo4j import GraphDatabase

from neopool.config import Neo4jConnectionConfig
from neopool.database import quote_identifier

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
