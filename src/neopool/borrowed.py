"""``async with``: borrow on entry, return on exit, whatever happened inside."""

from __future__ import annotations

import sys
from types import TracebackType

from neo4j import AsyncDriver

from neopool.database import preparer
from neopool.errors import LeaseError
from neopool.lease import PooledConnectionManager
from neopool.registry import GlobalNeo4jConnectionPool


class BorrowedConnection:
    """A borrow of the running loop's pool, as an async context manager.

    ``__aenter__`` returns the object itself, so the design note's LightRAG
    pattern (enter in ``initialize``, exit in ``finalize``) works as written.
    Leaving with an exception returns the lease too; a connectivity error also
    has the driver checked before the next borrow.
    """

    __slots__ = ("_entering", "_lease", "_registry", "_timeout")

    def __init__(
        self, timeout: float | None = None, *, registry: GlobalNeo4jConnectionPool | None = None
    ) -> None:
        self._timeout = timeout
        self._registry = registry or GlobalNeo4jConnectionPool()
        self._lease: PooledConnectionManager | None = None
        self._entering = False

    async def __aenter__(self) -> BorrowedConnection:
        if self._lease is not None or self._entering:
            raise LeaseError(
                "this BorrowedConnection already holds (or is taking) a lease; call "
                "Neo4jConnectionFactory.borrow_connection() again for a second one"
            )
        pool = self._registry.running_loop_pool("borrow_connection")
        if self._timeout is None:  # the usual case: a free lease, handed out without waiting
            self._lease = pool._lend_now(sys._getframe(1))
            if self._lease is not None:
                return self
        self._entering = True  # until the borrow ends: a second entry must not start one
        try:
            self._lease = await pool.borrow(self._timeout)
        finally:
            self._entering = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:  # exiting twice is harmless, as finalize() may run twice
            lease._pool.return_nowait(lease, exc)

    @property
    def connection(self) -> PooledConnectionManager | None:
        """The lease held now, or ``None`` outside the ``async with``."""
        return self._lease

    def _held(self) -> PooledConnectionManager:
        if self._lease is None:
            raise LeaseError(
                "this connection is not borrowed: use it inside 'async with "
                "Neo4jConnectionFactory.borrow_connection() as borrowed:' (or after "
                "'await borrowed.__aenter__()')"
            )
        return self._lease

    async def get_driver(self) -> AsyncDriver:
        """The running loop's driver; valid while the connection is borrowed."""
        lease = self._lease
        return (lease if lease is not None else self._held()).driver_now()

    async def prepare_database(
        self, workspace: str | None = None, database: str | None = None
    ) -> str | None:
        """The database for ``workspace``, created and indexed on first use only.

        ``NEO4J_DATABASE`` wins if set; otherwise ``database`` if given, else a
        name derived from the workspace (LightRAG's rule). Returns the database
        actually used, which is the server's default where it cannot create one.
        """
        lease = self._held()
        driver = lease.driver_now()
        return await preparer.prepare(driver, lease.pool.config, workspace, database)

    def __repr__(self) -> str:
        return f"<BorrowedConnection {self._lease!r}>"
