"""The design note's front door: borrow, stats and lifecycle in one place."""

from __future__ import annotations

from neopool.borrowed import BorrowedConnection
from neopool.config import Neo4jConnectionConfig
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import PoolStats, ProcessTotals


class Neo4jConnectionFactory:
    """Static helpers over the process-wide :class:`GlobalNeo4jConnectionPool`."""

    @staticmethod
    def borrow_connection(timeout: float | None = None) -> BorrowedConnection:
        """A connection of the running loop's pool, for ``async with``."""
        return BorrowedConnection(timeout)

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
