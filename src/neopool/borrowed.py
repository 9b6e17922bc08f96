"""``async with``: borrow on entry, return on exit, whatever happened inside.

Two shapes: :class:`BorrowedConnection` (the design note's: a lease you ask
the driver of) and :class:`PooledSession` (a driver session on a lease, in one
call). A task that holds a lease of the running loop's pool (through either)
runs the sessions and queries it opens inside on that same lease: nesting in
one task never waits for a second lease, so it cannot deadlock even at
``pool_max_size=1``. Tasks it spawns borrow their own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar

from neo4j import AsyncDriver, AsyncSession

from neopool.database import DEFAULT_SCHEMA, Schema, preparer
from neopool.errors import LeaseError
from neopool.lease import PooledConnectionManager
from neopool.loop_pool import EventLoopConnectionPool
from neopool.registry import GlobalNeo4jConnectionPool

__all__ = ["BorrowedConnection", "PooledSession"]

_T = TypeVar("_T")


class _Holding:
    """A lease one task holds now, which sessions it opens inside may use too."""

    __slots__ = ("active", "lease", "previous", "task")

    def __init__(
        self,
        lease: PooledConnectionManager,
        task: asyncio.Task[Any] | None,
        previous: _Holding | None,
    ) -> None:
        self.lease = lease
        self.task = task
        self.previous = previous
        self.active = True

    def end(self) -> None:
        """Stop lending the lease, and uncover the holding it covered.

        Only a context that shows this holding is changed: its own task's, or
        that of a task it spawned that ends it (each has its own copy).
        """
        self.active = False
        if _holding.get() is self:
            _holding.set(self.previous)


#: The innermost lease held by the current task (a child task sees it, but it is not its task).
_holding: ContextVar[_Holding | None] = ContextVar("neopool_holding", default=None)


def _held_by_this_task(pool: EventLoopConnectionPool) -> PooledConnectionManager | None:
    """The lease of ``pool`` the current task holds now, if any."""
    holding = _holding.get()
    if (
        holding is not None
        and holding.active
        and holding.lease._pool is pool
        and holding.task is asyncio.current_task()
    ):
        return holding.lease
    return None


def _hold(lease: PooledConnectionManager) -> _Holding:
    holding = _Holding(lease, asyncio.current_task(), _holding.get())
    _holding.set(holding)
    return holding


class BorrowedConnection:
    """A borrow of the running loop's pool, as an async context manager.

    ``__aenter__`` returns the object itself, so the design note's LightRAG
    pattern (enter in ``initialize``, exit in ``finalize``) works as written.
    Leaving with an exception returns the lease too; a connectivity error also
    has the driver checked before the next borrow. While it is held,
    :meth:`Neo4jConnectionFactory.session` in the same task uses this lease.
    """

    __slots__ = ("_entering", "_holding", "_lease", "_registry", "_timeout")

    def __init__(
        self, timeout: float | None = None, *, registry: GlobalNeo4jConnectionPool | None = None
    ) -> None:
        self._timeout = timeout
        self._registry = registry or GlobalNeo4jConnectionPool()
        self._lease: PooledConnectionManager | None = None
        self._holding: _Holding | None = None
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
                self._holding = _hold(self._lease)
                return self
        self._entering = True  # until the borrow ends: a second entry must not start one
        try:
            self._lease = await pool.borrow(self._timeout)
        finally:
            self._entering = False
        self._holding = _hold(self._lease)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        holding, self._holding = self._holding, None
        if holding is not None:
            holding.end()
        if lease is not None:  # exiting twice is harmless, as finalize() may run twice
            lease._pool._return_nowait(lease, exc)

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
        return (lease if lease is not None else self._held())._driver_now()

    async def prepare_database(
        self,
        workspace: str | None = None,
        database: str | None = None,
        *,
        schema: Schema | None = DEFAULT_SCHEMA,
    ) -> str | None:
        """The database for ``workspace``, created and given ``schema`` on first use only.

        ``NEO4J_DATABASE`` wins if set; otherwise ``database`` if given, else a
        name derived from the workspace (LightRAG's rule). Returns the database
        actually used, which is the server's default where it cannot create one
        (unless ``database_fallback`` is off: then :class:`MissingDatabase`).

        ``schema`` is what to create there: the default keeps the design note's
        behaviour (``entity_id`` unique on the workspace's label, as LightRAG
        wants); pass :meth:`Schema.index`, :meth:`Schema.unique` with a label of
        your own, or ``None`` for nothing.
        """
        lease = self._held()
        driver = lease._driver_now()
        return await preparer.prepare(driver, lease.pool.config, workspace, database, schema)

    def __repr__(self) -> str:
        return f"<BorrowedConnection {self._lease!r}>"


class PooledSession:
    """A driver session on a lease of the running loop's pool, as an async context manager.

    Entering borrows a lease (or uses the one this task already holds of the
    pool) and opens ``driver.session(**session_kwargs)``; leaving closes the
    session and returns the lease it borrowed, on every path (an exception,
    cancellation). Made by :meth:`Neo4jConnectionFactory.session`.
    """

    __slots__ = ("_holding", "_kwargs", "_registry", "_session", "_timeout")

    def __init__(
        self,
        session_kwargs: dict[str, Any],
        timeout: float | None = None,
        *,
        registry: GlobalNeo4jConnectionPool | None = None,
    ) -> None:
        self._kwargs = session_kwargs
        self._timeout = timeout
        self._registry = registry or GlobalNeo4jConnectionPool()
        self._session: AsyncSession | None = None
        self._holding: _Holding | None = None

    async def __aenter__(self) -> AsyncSession:
        if self._session is not None:
            raise LeaseError(
                "this session is open already; call Neo4jConnectionFactory.session() "
                "again for a second one"
            )
        pool = self._registry.running_loop_pool("session")
        lease = _held_by_this_task(pool)
        if lease is None:
            lease = await pool.borrow(self._timeout)
            self._holding = _hold(lease)
        try:
            self._session = lease._driver_now().session(**self._kwargs)
        except BaseException as exc:
            self._give_back(exc)
            raise
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        error = exc
        if isinstance(exc, GeneratorExit):  # the coroutine is being closed: it cannot await
            self._give_back(exc)
            return
        try:  # closes the session; on cancellation, without waiting for the server
            await session.__aexit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        except BaseException as close_error:
            error = close_error
            raise
        finally:
            self._give_back(error)

    def _give_back(self, error: BaseException | None) -> None:
        holding, self._holding = self._holding, None
        if holding is not None:  # borrowed here: returned here
            holding.end()
            holding.lease._pool._return_nowait(holding.lease, error)

    def __repr__(self) -> str:
        state = "open" if self._session is not None else "not open"
        return f"<PooledSession {state}, {self._kwargs.get('database') or '(default database)'}>"


async def on_lease(
    action: str,
    work: Callable[[AsyncDriver, PooledConnectionManager], Awaitable[_T]],
    registry: GlobalNeo4jConnectionPool | None = None,
) -> _T:
    """``work(driver, lease)`` on a lease of the running loop's pool (this task's, if held)."""
    pool = (registry or GlobalNeo4jConnectionPool()).running_loop_pool(action)
    lease = _held_by_this_task(pool)
    if lease is not None:
        return await work(lease._driver_now(), lease)
    lease = await pool.borrow()
    holding = _hold(lease)
    error: BaseException | None = None
    try:
        return await work(lease._driver_now(), lease)
    except BaseException as exc:
        error = exc
        raise
    finally:
        holding.end()
        pool._return_nowait(lease, error)
