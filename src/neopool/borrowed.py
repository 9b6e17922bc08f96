"""``async with``: borrow on entry, return on exit, whatever happened inside.

Two shapes: :class:`BorrowedConnection` (the design note's: a lease you ask
the driver of) and :class:`PooledSession` (a driver session on a lease, in one
call). A lease held through either is *lent* to the code inside: sessions and
queries opened there (these, ``execute_query``, ``prepare_database``, and the
LightRAG integration's storage sessions) run on it instead of borrowing a
second one, so nesting never waits for itself, even at ``pool_max_size=1``.

The one mechanism for that is here: a :class:`SharedLease` counts the users
of one borrowed lease and the last to leave returns it; a :class:`Lending`
makes it the lease that code running in a context uses. A lending is for the
task that made it (tasks it spawns borrow their own), or also for the tasks
spawned inside it where the lender says so (LightRAG's storage sessions,
because ``asyncio.wait_for`` runs its coroutine in a task of its own before
Python 3.12).
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar

from neo4j import AsyncDriver, AsyncSession
from neo4j.exceptions import AuthError

from neopool.database import DEFAULT_SCHEMA, Schema, preparer
from neopool.errors import LeaseError
from neopool.lease import PooledConnectionManager
from neopool.loop_pool import CONNECTIVITY_ERRORS, EventLoopConnectionPool
from neopool.registry import GlobalNeo4jConnectionPool

__all__ = ["BorrowedConnection", "PooledSession"]

_T = TypeVar("_T")

#: The errors the pool acts on when a lease comes back (see ``_return_nowait``).
_POOL_ERRORS = (*CONNECTIVITY_ERRORS, AuthError)


# -- one lease, used by nested code ------------------------------------------------------


class SharedLease:
    """A borrowed lease and how many users hold it now; the last to leave returns it.

    Nested code joins the lease held around it rather than borrowing another;
    the count lets whichever user ends last give it back, in whatever order
    they end (a task spawned inside may outlive its lender). The first error
    the pool acts on (connectivity, a refused logon) is kept for the return,
    whichever user met it: the last to leave may have left cleanly.
    """

    __slots__ = ("__weakref__", "_dropped", "_error", "lease", "pool", "users")

    def __init__(
        self,
        lease: PooledConnectionManager,
        on_dropped: Callable[[PooledConnectionManager], None] | None = None,
    ) -> None:
        self.lease = lease
        self.pool = lease._pool
        self.users = 1
        self._error: BaseException | None = None
        # Collected with users left (their task destroyed mid-session): ``on_dropped(lease)``
        # gives it back. Without one, the pool's own lost-lease warning does.
        self._dropped = None if on_dropped is None else weakref.finalize(self, on_dropped, lease)

    def leave(self, error: BaseException | None = None) -> None:
        """One user is done; the last returns the lease. Never awaits.

        The return carries the first error the pool acts on, whoever met it, else
        the last user's own (a closed coroutine's ``GeneratorExit`` always its own).
        """
        if error is not None and self._error is None and isinstance(error, _POOL_ERRORS):
            self._error = error
        self.users -= 1
        if self.users > 0:
            return
        dropped = self._dropped
        if dropped is not None and dropped.detach() is None:
            return  # its drop handler ran already and gave the lease back
        if self._error is not None and not isinstance(error, GeneratorExit):
            error = self._error
        self.pool._return_nowait(self.lease, error)

    def __repr__(self) -> str:
        return f"<SharedLease {self.lease!r}, {self.users} user(s)>"


class Lending:
    """One entry of what code running in a context may use: a shared lease, and for whom.

    Entries stack (each covers the one before); :meth:`end` uncovers the
    previous one in the context that shows this entry (its own task's) and
    stops it lending anywhere: a task spawned inside keeps a copy of the
    stack, which must not lend it a lease its lender still holds for others.
    The task is held weakly: a context captured inside (a callback, a task)
    must not keep it, its exception and its frames alive.
    """

    __slots__ = ("active", "previous", "shared", "task", "to_spawned_tasks")

    def __init__(
        self, shared: SharedLease, task: asyncio.Task[Any] | None, to_spawned_tasks: bool = False
    ) -> None:
        """Start lending ``shared`` to the code that runs in ``task`` (the current one) from
        now on: this entry covers the context's innermost one until :meth:`end`."""
        self.shared = shared
        self.task = None if task is None else weakref.ref(task)
        self.to_spawned_tasks = to_spawned_tasks
        self.previous = _lending.get()
        self.active = True
        _lending.set(self)

    def made_in(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` made this entry (and so is the one that ends it)."""
        own = self.task
        return (own() if own is not None else None) is task

    def lends_to(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether code running in ``task`` (the current one) may use the lease."""
        return self.active and (self.to_spawned_tasks or self.made_in(task))

    def end(self) -> None:
        """Stop lending: the context that shows this entry shows the one it covered."""
        self.active = False
        if _lending.get() is self:
            _lending.set(self.previous)


#: The innermost lending of the running context (tasks spawned here start with a copy).
_lending: ContextVar[Lending | None] = ContextVar("neopool_lending", default=None)


def lent_lease(pool: EventLoopConnectionPool) -> SharedLease | None:
    """The lease of ``pool`` lent to the code running here, if one is still out."""
    lending = _lending.get()
    if lending is None:  # the usual case
        return None
    task = asyncio.current_task()
    while lending is not None:
        shared = lending.shared
        if shared.users > 0 and shared.pool is pool and lending.lends_to(task):
            return shared
        lending = lending.previous
    return None


async def take_lease(
    pool: EventLoopConnectionPool,
    timeout: float | None = None,
    *,
    on_dropped: Callable[[PooledConnectionManager], None] | None = None,
) -> SharedLease:
    """Join the lease of ``pool`` lent here, or borrow one (waiting up to ``timeout``).

    ``pool`` is the running loop's. Every taker calls :meth:`SharedLease.leave`
    once when done; ``on_dropped`` is for a lease borrowed here (see :class:`SharedLease`).
    """
    shared = lent_lease(pool)
    if shared is not None:
        shared.users += 1
        return shared
    # A timeout given goes through borrow(), which checks it before lending.
    lease = pool._lend_now(sys._getframe(1)) if timeout is None else None
    if lease is None:
        lease = await pool.borrow(timeout)
    return SharedLease(lease, on_dropped)


def lend(shared: SharedLease, *, to_spawned_tasks: bool = False) -> Lending | None:
    """Lend ``shared`` to the code that runs here from now on (and to the tasks it spawns,
    if ``to_spawned_tasks``) until :meth:`Lending.end`; ``None`` if it is lent so already."""
    current = _lending.get()
    task = asyncio.current_task()
    if (  # a lending of this task's own, that ends after this one: it covers it
        current is not None
        and current.shared is shared
        and current.active
        and current.made_in(task)
        and (current.to_spawned_tasks or not to_spawned_tasks)
    ):
        return None
    return Lending(shared, task, to_spawned_tasks)


# -- the async-with shapes ---------------------------------------------------------------


class BorrowedConnection:
    """A borrow of the running loop's pool, as an async context manager.

    ``__aenter__`` returns the object itself, so the design note's LightRAG
    pattern (enter in ``initialize``, exit in ``finalize``) works as written.
    Leaving with an exception returns the lease too; a connectivity error also
    has the driver checked before the next borrow. Always a borrow of its own;
    while it is held, the sessions and queries the same task opens use it.
    """

    __slots__ = ("_entering", "_lending", "_registry", "_shared", "_timeout")

    def __init__(
        self, timeout: float | None = None, *, registry: GlobalNeo4jConnectionPool | None = None
    ) -> None:
        self._timeout = timeout
        self._registry = registry or GlobalNeo4jConnectionPool()
        self._shared: SharedLease | None = None
        self._lending: Lending | None = None
        self._entering = False

    async def __aenter__(self) -> BorrowedConnection:
        if self._shared is not None or self._entering:
            raise LeaseError(
                "this BorrowedConnection already holds (or is taking) a lease; call "
                "Neo4jConnectionFactory.borrow_connection() again for a second one"
            )
        pool = self._registry.running_loop_pool("borrow_connection")
        # A timeout given goes through borrow(), which checks it before lending.
        lease = pool._lend_now(sys._getframe(1)) if self._timeout is None else None
        if lease is None:
            self._entering = True  # until the borrow ends: a second entry must not start one
            try:
                lease = await pool.borrow(self._timeout)
            finally:
                self._entering = False
        shared = self._shared = SharedLease(lease)
        # A lease of its own, so no lending of the task's covers it (what lend() checks).
        self._lending = Lending(shared, asyncio.current_task())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shared, self._shared = self._shared, None
        lending, self._lending = self._lending, None
        if lending is not None:
            lending.end()
        if shared is not None:  # exiting twice is harmless, as finalize() may run twice
            shared.leave(exc)

    @property
    def connection(self) -> PooledConnectionManager | None:
        """The lease held now, or ``None`` outside the ``async with``."""
        shared = self._shared
        return shared.lease if shared is not None else None

    def _held(self) -> PooledConnectionManager:
        shared = self._shared
        if shared is None:
            raise LeaseError(
                "this connection is not borrowed: use it inside 'async with "
                "Neo4jConnectionFactory.borrow_connection() as borrowed:' (or after "
                "'await borrowed.__aenter__()')"
            )
        return shared.lease

    async def get_driver(self) -> AsyncDriver:
        """The running loop's driver; valid while the connection is borrowed."""
        return self._held()._driver_now()

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
        return f"<BorrowedConnection {self.connection!r}>"


class PooledSession:
    """A driver session on a lease of the running loop's pool, as an async context manager.

    Entering takes a lease (the one lent here, if any: see the module's
    docstring) and opens ``driver.session(**session_kwargs)``; leaving closes
    the session and leaves the lease, on every path (an exception,
    cancellation). Made by :meth:`Neo4jConnectionFactory.session`.
    """

    __slots__ = ("_kwargs", "_lending", "_registry", "_session", "_shared", "_timeout")

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
        self._shared: SharedLease | None = None
        self._lending: Lending | None = None

    async def __aenter__(self) -> AsyncSession:
        if self._session is not None:
            raise LeaseError(
                "this session is open already; call Neo4jConnectionFactory.session() "
                "again for a second one"
            )
        shared = await take_lease(self._registry.running_loop_pool("session"), self._timeout)
        try:
            self._session = shared.lease._driver_now().session(**self._kwargs)
        except BaseException as exc:
            shared.leave(exc)
            raise
        self._shared = shared
        self._lending = lend(shared)
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
            self._leave(exc)
            return
        try:  # closes the session; on cancellation, without waiting for the server
            await session.__aexit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        except BaseException as close_error:
            error = close_error
            raise
        finally:
            self._leave(error)

    def _leave(self, error: BaseException | None) -> None:
        shared, self._shared = self._shared, None
        lending, self._lending = self._lending, None
        if lending is not None:
            lending.end()
        if shared is not None:
            shared.leave(error)

    def __repr__(self) -> str:
        state = "open" if self._session is not None else "not open"
        return f"<PooledSession {state}, {self._kwargs.get('database') or '(default database)'}>"


async def on_lease(
    action: str,
    work: Callable[[AsyncDriver, PooledConnectionManager], Awaitable[_T]],
    registry: GlobalNeo4jConnectionPool | None = None,
) -> _T:
    """``work(driver, lease)`` on a lease of the running loop's pool (the one lent here, if any).

    ``work`` opens nothing nested (a query, a preparation), so the lease is not lent to it.
    """
    shared = await take_lease((registry or GlobalNeo4jConnectionPool()).running_loop_pool(action))
    error: BaseException | None = None
    try:
        return await work(shared.lease._driver_now(), shared.lease)
    except BaseException as exc:
        error = exc
        raise
    finally:
        shared.leave(error)
