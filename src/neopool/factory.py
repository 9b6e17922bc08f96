"""The design note's front door: borrow, sessions, stats and lifecycle in one place."""

from __future__ import annotations

from typing import Any

from neo4j import AsyncDriver

from neopool.borrowed import BorrowedConnection, PooledSession, on_lease
from neopool.config import Neo4jConnectionConfig
from neopool.database import DEFAULT_SCHEMA, Schema, preparer
from neopool.lease import PooledConnectionManager
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PoolStats, ProcessTotals


class Neo4jConnectionFactory:
    """Static helpers over the process-wide :class:`GlobalNeo4jConnectionPool`."""

    @staticmethod
    def borrow_connection(timeout: float | None = None) -> BorrowedConnection:
        """A connection of the running loop's pool, for ``async with``."""
        return BorrowedConnection(timeout)

    @staticmethod
    def session(database: str | None = None, **session_kwargs: Any) -> PooledSession:
        """A driver session on a lease of the running loop's pool, for ``async with``::

            async with Neo4jConnectionFactory.session(database="neo4j") as session:
                result = await session.run("MATCH (n) RETURN count(n) AS n")

        Borrows a lease (waiting up to ``borrow_timeout``), opens
        ``driver.session(database=database, **session_kwargs)`` and, on the
        way out, closes the session and returns the lease on every path,
        cancellation included. A task that already holds a lease of this
        loop's pool (an enclosing ``session()`` or ``borrow_connection()``)
        opens the session on that lease: nesting in one task never waits for a
        second lease. Tasks it spawns borrow their own.
        """
        return PooledSession({"database": database, **session_kwargs})

    @staticmethod
    async def execute_query(
        query: Any,
        parameters: dict[str, Any] | None = None,
        database: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``driver.execute_query`` on a lease of the running loop's pool.

        A managed, retried transaction of its own; ``kwargs`` go to the driver
        as they are (``routing_=RoutingControl.READ``, ``result_transformer_=``,
        or query parameters). Returns the driver's ``EagerResult`` (records,
        summary, keys) unless a ``result_transformer_`` says otherwise. Uses the
        task's lease where it holds one, like :meth:`session`.
        """

        async def run(driver: AsyncDriver, _: PooledConnectionManager) -> Any:
            return await driver.execute_query(query, parameters, database_=database, **kwargs)

        return await on_lease("execute_query", run)

    @staticmethod
    async def prepare_database(
        workspace: str | None = None,
        database: str | None = None,
        *,
        schema: Schema | None = DEFAULT_SCHEMA,
    ) -> str | None:
        """:meth:`BorrowedConnection.prepare_database` on a lease of its own (or the task's).

        Once per process: later calls, from any loop or thread, run no Cypher.
        """

        async def prepare(driver: AsyncDriver, lease: PooledConnectionManager) -> str | None:
            return await preparer.prepare(driver, lease.pool.config, workspace, database, schema)

        return await on_lease("prepare_database", prepare)

    @staticmethod
    def set_config(config: Neo4jConnectionConfig) -> None:
        """Use ``config`` for pools created from now on."""
        GlobalNeo4jConnectionPool.set_config(config)

    @staticmethod
    async def get_pool_stats() -> dict[str, PoolStats]:
        """``{loop id: stats}`` for every live event loop's pool of this process."""
        return await GlobalNeo4jConnectionPool().get_pool_stats()

    @staticmethod
    def process_totals() -> ProcessTotals:
        """Loops served, drivers created and closed, borrows: this process's, since it started."""
        return GlobalNeo4jConnectionPool().process_totals()

    @staticmethod
    async def close_all_pools(timeout: float | None = None) -> None:
        """Close every pool of this process, each on its own loop."""
        await GlobalNeo4jConnectionPool().close_all_pools(timeout)
