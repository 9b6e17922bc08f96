"""LightRAG's Neo4j graph storage on the running loop's pooled driver.

lightrag-hku's ``Neo4JStorage.initialize`` opens a driver and probes, creates
and indexes its database; ``finalize`` closes the driver. A worker that builds
a LightRAG per task pays all of that per task. :class:`PooledNeo4JStorage`
keeps every query of ``Neo4JStorage`` and changes only where its driver comes
from and how long it is held:

* ``initialize`` prepares the workspace's database through the process-wide
  cache (once per process) and gives the storage a :class:`LeasedDriver`;
* every session the storage opens holds a lease of the running loop's pool
  for the session's life (``pool_max_size`` bounds concurrent *sessions*, not
  live storages: any number of LightRAG instances share one loop and driver);
  one opened inside another (the storage's or ``Neo4jConnectionFactory.session()``)
  uses the lease held around it (:mod:`neopool.borrowed` lends it);
* ``finalize`` forgets the driver; the loop's driver stays open for the next
  storage. A storage that is garbage-collected without ``finalize`` holds no
  lease between sessions; one warning names where it was initialised.

Writes that lose a race for a new entity to another process (the uniqueness
constraint ``prepare_database`` adds refuses the second ``MERGE``) are retried:
the transaction function runs again and finds the node.

>>> from neopool.integrations.lightrag import register   # doctest: +SKIP
>>> register()
>>> rag = LightRAG(graph_storage="PooledNeo4JStorage", ...)

The server and pool settings come from ``GlobalNeo4jConnectionPool.set_config``
or, if none was set, from what stock ``Neo4JStorage`` reads: the ``NEO4J_*``
variables first, then the ``[neo4j]`` section of LightRAG's ``config.ini``
(:func:`lightrag_config`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import CodeType, TracebackType
from typing import Any, TypeVar

from lightrag.kg.neo4j_impl import Neo4JStorage
from neo4j import AsyncDriver, AsyncSession
from neo4j.exceptions import AuthError, ClientError, ConstraintError, TransientError

from neopool import _fork
from neopool.borrowed import Lending, SharedLease, lend, on_lease, take_lease
from neopool.config import Neo4jConnectionConfig
from neopool.database import Schema, database_name_for, preparer, shown
from neopool.errors import LeaseError
from neopool.lease import PooledConnectionManager
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import SayOnce

logger = logging.getLogger("neopool")

_T = TypeVar("_T")

STORAGE_NAME = "PooledNeo4JStorage"

#: What LightRAG's graph needs in its database: ``entity_id`` unique on the workspace's
#: label (stock LightRAG makes a plain index there; the constraint also stops two
#: processes from creating one entity twice, and replaces that index where Neo4j insists).
LIGHTRAG_SCHEMA = Schema.unique(label=None, key="entity_id")

#: Attempts after the first for a write that lost a race to create the same entity.
_LOST_RACE_RETRIES = 5
#: Upper bound of the first jittered pause before such a retry (doubled each time).
_LOST_RACE_BACKOFF_S = 0.02

#: ``Neo4jConnectionConfig`` field -> (environment variable, config.ini key), as stock reads them.
_LIGHTRAG_SETTINGS = {
    "uri": ("NEO4J_URI", "uri"),
    "username": ("NEO4J_USERNAME", "username"),
    "password": ("NEO4J_PASSWORD", "password"),
    "max_connection_pool_size": ("NEO4J_MAX_CONNECTION_POOL_SIZE", "connection_pool_size"),
    "connection_timeout": ("NEO4J_CONNECTION_TIMEOUT", "connection_timeout"),
    "connection_acquisition_timeout": (
        "NEO4J_CONNECTION_ACQUISITION_TIMEOUT",
        "connection_acquisition_timeout",
    ),
    "max_transaction_retry_time": (
        "NEO4J_MAX_TRANSACTION_RETRY_TIME",
        "max_transaction_retry_time",
    ),
    "max_connection_lifetime": ("NEO4J_MAX_CONNECTION_LIFETIME", "max_connection_lifetime"),
    "liveness_check_timeout": ("NEO4J_LIVENESS_CHECK_TIMEOUT", "liveness_check_timeout"),
    "keep_alive": ("NEO4J_KEEP_ALIVE", "keep_alive"),
}


def lightrag_config(**overrides: Any) -> Neo4jConnectionConfig:
    """The configuration stock ``Neo4JStorage`` would use, as a :class:`Neo4jConnectionConfig`.

    Same precedence as stock: each ``NEO4J_*`` variable that is set wins, then
    the ``[neo4j]`` section of the ``config.ini`` LightRAG read (from the
    working directory, when ``lightrag.kg.neo4j_impl`` was imported), then the
    defaults. ``overrides`` (any field, e.g. ``pool_max_size=20``) win over
    both. Pass the result to ``neopool.celery.setup(app, lightrag_config())``
    where workers are configured by ``config.ini`` alone.
    """
    from lightrag.kg import neo4j_impl

    ini = neo4j_impl.config
    values: dict[str, Any] = {}
    if ini.has_section("neo4j"):
        for field, (variable, key) in _LIGHTRAG_SETTINGS.items():
            if variable not in os.environ and ini.has_option("neo4j", key):
                values[field] = ini.get("neo4j", key)
    values.update(overrides)
    return Neo4jConnectionConfig(**values)


# -- leases per session ---------------------------------------------------------------


async def _take_lease(registry: GlobalNeo4jConnectionPool, site: _Site) -> SharedLease:
    """The lease lent here (an enclosing storage or neopool session's), or a new one.

    A lease borrowed here that is collected while still in use (its task
    destroyed mid-session) is given back and reported with the storage's drops.
    """
    pool = registry.running_loop_pool("open a session")
    return await take_lease(pool, on_dropped=functools.partial(_session_dropped, site=site))


async def _retry_lost_races(attempt: Callable[[], Awaitable[_T]]) -> _T:
    """Run a write; run it again if it lost a race to create the same unique entity.

    A ``MERGE`` that finds no node creates one; two concurrent ones (in two
    processes) can both find none. With ``entity_id`` unique, the server lets
    one commit and refuses the other (``ConstraintValidationFailed``). Run
    again, the loser's ``MERGE`` finds the winner's node and updates it. A
    managed transaction function must already be safe to run again (the driver
    reruns it after transient errors), so this adds no new requirement. A write
    that conflicts every time (a real violation) fails after the retries.
    """
    for retry in range(_LOST_RACE_RETRIES + 1):
        try:
            return await attempt()
        except ConstraintError:
            if retry == _LOST_RACE_RETRIES:
                raise
            _races.lost += 1
            await asyncio.sleep(random.uniform(0, _LOST_RACE_BACKOFF_S * 2**retry))
    raise AssertionError("unreachable")  # pragma: no cover


class _Races:
    """How many writes lost a race and were run again (process-wide, for stats)."""

    def __init__(self) -> None:
        self.lost = 0


_races = _Races()


def lost_races_retried() -> int:
    """How many writes of this process lost a race for a new entity and were run again."""
    return _races.lost


class LeasedSession:
    """A session of the loop's driver that holds a lease of its pool while open.

    ``async with driver.session(...) as session`` takes a lease on entry and
    leaves it on exit, whatever happens inside; used without ``async with``,
    the first query takes it and :meth:`close` leaves it. The lease is the
    one lent here if there is one (a storage or neopool session around it),
    else a borrow of its own. Entered with ``async with``, the session lends
    its lease to what runs inside: sessions opened later in the same code
    (LightRAG's ``get_knowledge_graph`` falls back to ``_robust_fallback``
    inside its own session) and in tasks spawned there (``asyncio.wait_for``
    before Python 3.12, ``gather``). Everything else is the driver's own
    :class:`neo4j.AsyncSession`; ``execute_write`` also retries a write that
    lost a race for a unique entity (:func:`_retry_lost_races`).
    """

    def __init__(self, owner: LeasedDriver, config: dict[str, Any]) -> None:
        self._owner = owner
        self._config = config
        self._shared: SharedLease | None = None
        self._session: AsyncSession | None = None
        self._lending: Lending | None = None

    async def _open(self) -> AsyncSession:
        if self._session is not None:
            return self._session
        shared = await _take_lease(self._owner.registry, self._owner.site)
        try:
            session = (await shared.lease.get_driver()).session(**self._config)
        except BaseException as exc:
            shared.leave(exc)
            raise
        self._shared, self._session = shared, session
        return session

    async def __aenter__(self) -> LeasedSession:
        await self._open()
        assert self._shared is not None
        self._lending = lend(self._shared, to_spawned_tasks=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._owner.errors is not None:
            self._owner.errors.append(exc)
        session, self._session = self._session, None
        shared, self._shared = self._shared, None
        lending, self._lending = self._lending, None
        try:
            if session is not None:
                await session.__aexit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        finally:
            if lending is not None:
                lending.end()
            if shared is not None:
                shared.leave(exc)

    async def close(self) -> None:
        """Close the session and return its lease (for use without ``async with``)."""
        await self.__aexit__(None, None, None)

    # -- the session's own API, opening it first where used without ``async with`` --
    async def run(self, query: Any, parameters: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """:meth:`neo4j.AsyncSession.run`."""
        return await (await self._open()).run(query, parameters, **kwargs)

    async def execute_read(self, transaction_function: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`neo4j.AsyncSession.execute_read`."""
        session = await self._open()
        return await session.execute_read(transaction_function, *args, **kwargs)

    async def execute_write(self, transaction_function: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`neo4j.AsyncSession.execute_write`, run again after a lost entity race."""
        session = await self._open()
        return await _retry_lost_races(
            lambda: session.execute_write(transaction_function, *args, **kwargs)
        )

    async def begin_transaction(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`neo4j.AsyncSession.begin_transaction`."""
        return await (await self._open()).begin_transaction(*args, **kwargs)

    async def last_bookmarks(self) -> Any:
        """:meth:`neo4j.AsyncSession.last_bookmarks`."""
        return await (await self._open()).last_bookmarks()

    def __getattr__(self, name: str) -> Any:
        session = self.__dict__.get("_session")
        if session is None:
            raise AttributeError(
                f"{name!r} needs an open session: use 'async with driver.session() as session'"
            )
        return getattr(session, name)


class LeasedDriver:
    """Stands in for the loop's :class:`neo4j.AsyncDriver` in a storage.

    ``session()`` returns a :class:`LeasedSession`, which holds a lease of the
    running loop's pool for as long as it is open; ``execute_query`` holds one
    for its one query (each the lease lent here, if any). The driver itself is
    the pool's, found at each session (a driver the pool replaced after a
    connectivity error is never used again); ``close()`` does nothing, since
    the pool owns the driver. Other attributes are the current driver's.
    """

    def __init__(
        self,
        registry: GlobalNeo4jConnectionPool | None = None,
        *,
        site: _Site = None,
        errors: list[BaseException] | None = None,
    ) -> None:
        self.registry = registry or GlobalNeo4jConnectionPool()
        #: Where the storage that uses it was initialised, for warnings.
        self.site = site
        #: If a list: every exception that left one of its sessions is appended.
        self.errors = errors

    def session(self, **config: Any) -> LeasedSession:
        """A session that holds a lease while open (``async with`` it)."""
        return LeasedSession(self, config)

    async def execute_query(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`neo4j.AsyncDriver.execute_query` on a lease held for the query (the one lent
        here, if any)."""
        shared = await _take_lease(self.registry, self.site)
        error: BaseException | None = None
        try:
            driver = await shared.lease.get_driver()
            return await _retry_lost_races(lambda: driver.execute_query(*args, **kwargs))
        except BaseException as exc:
            error = exc
            raise
        finally:
            shared.leave(error)

    async def close(self) -> None:
        """Nothing to do: the loop's pool owns the driver and closes it with the loop."""

    @property
    def driver(self) -> AsyncDriver:
        """The running loop's driver now (opened by the first session)."""
        driver = self.registry.running_loop_pool("get the driver").driver
        if driver is None:
            raise LeaseError("the loop's driver is not open yet: open a session first")
        return driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    def __repr__(self) -> str:
        return f"<LeasedDriver of the running loop's pool, for {_site_text(self.site)}>"


# -- the storage -------------------------------------------------------------------------


class PooledNeo4JStorage(Neo4JStorage):  # type: ignore[misc]
    """``Neo4JStorage`` whose sessions borrow from the running loop's pool."""

    def __init__(
        self,
        namespace: str,
        global_config: dict[str, Any],
        embedding_func: Any,
        workspace: Any = None,
    ) -> None:
        super().__init__(namespace, global_config, embedding_func, workspace)
        self._driver: LeasedDriver | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    async def initialize(self) -> None:
        """Prepare this workspace's database (once per process) and take the loop's driver.

        No lease is kept: each session the storage opens takes one (or uses the
        one held around it).
        """
        if self._driver is not None:
            return  # initialised already; LightRAG may call this more than once
        _report_dropped()  # a report pending from a loop that closed before it could say it
        registry = GlobalNeo4jConnectionPool()
        registry.set_config_if_unset(lightrag_config)
        site = _initialised_at()

        async def prepare(
            driver: AsyncDriver, lease: PooledConnectionManager
        ) -> tuple[Neo4jConnectionConfig, str | None]:
            config = lease.pool.config
            # Neo4JStorage names the database after the namespace, not the workspace.
            database = database_name_for(self.namespace)
            prepared = await preparer.prepare(
                driver, config, self.workspace, database, LIGHTRAG_SCHEMA
            )
            return config, prepared

        # A unit of work like any other: on one lease (the one lent here, if any).
        config, database = await on_lease("initialize", prepare, registry)
        if self._driver is not None:
            return  # a concurrent initialize() of this storage finished first
        self._DATABASE = database
        self._driver = LeasedDriver(registry, site=site)
        loop = weakref.ref(asyncio.get_running_loop())
        self._finalizer = weakref.finalize(self, _storage_dropped, site, loop, os.getpid())
        try:
            await _fulltext.ensure(self, config)
        except BaseException:  # cancelled: not initialised after all
            await self.finalize()
            raise

    async def finalize(self) -> None:
        """Forget the driver; the loop's pool keeps it open for the next storage."""
        self._driver = None
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()


# -- the full-text index -------------------------------------------------------------------


class _FullTextIndexes:
    """LightRAG's full-text index per (server, database, label): ensured once per process.

    ``Neo4JStorage._create_fulltext_index`` logs its failures and returns; run on
    a :class:`LeasedDriver` that records what left its sessions, the outcome is
    known. A statement the server refused (a ``ClientError``: ArcadeDB has no
    full-text indexes, a user lacks the privilege) is not tried again in this
    process; any other failure (the server unreachable, busy, timing out) is
    tried again by the next storage to initialise. Concurrent storages of one
    workspace leave it to the first.
    """

    DONE = "done"
    REFUSED = "refused"
    RUNNING = "running"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[tuple[str, ...], str] = {}

    async def ensure(self, storage: PooledNeo4JStorage, config: Neo4jConnectionConfig) -> None:
        create = getattr(storage, "_create_fulltext_index", None)  # lightrag-hku >= 1.4
        driver = storage._driver
        if create is None or driver is None:
            return
        label = storage._get_workspace_label()
        key = (*config.server_key, str(storage._DATABASE), label)
        with self._lock:
            if key in self._state:
                return  # done, refused, or another storage is on it
            self._state[key] = self.RUNNING
        errors: list[BaseException] = []
        outcome: str | None = None
        try:
            await create(
                LeasedDriver(driver.registry, site=driver.site, errors=errors),
                storage._DATABASE,
                label,
            )
            outcome = self._outcome(errors)
        finally:
            with self._lock:
                if outcome is None:
                    del self._state[key]  # failed or cancelled: the next initialise tries again
                else:
                    self._state[key] = outcome
        if outcome is None:
            logger.info(
                "neopool: the full-text index of workspace %s could not be ensured (%s); "
                "the next storage to initialise tries again",
                shown(storage.workspace),
                type(errors[-1]).__name__,
            )
        elif outcome == self.REFUSED:
            logger.info(
                "neopool: the server refused the full-text index of workspace %s (%s); "
                "not tried again in this process (label search falls back to CONTAINS)",
                shown(storage.workspace),
                getattr(errors[-1], "code", type(errors[-1]).__name__),
            )

    def _outcome(self, errors: list[BaseException]) -> str | None:
        """DONE, REFUSED, or ``None`` for a failure worth trying again."""
        if not errors:
            return self.DONE
        last = errors[-1]
        if (
            isinstance(last, ClientError)
            and not isinstance(last, (AuthError, TransientError))
            and not (last.code or "").startswith("Neo.ClientError.Security.")
        ):
            return self.REFUSED
        return None

    def clear(self) -> None:
        with self._lock:
            self._state.clear()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._state = {k: v for k, v in self._state.items() if v != self.RUNNING}


_fulltext = _FullTextIndexes()


def _forget_fulltext_indexes() -> None:
    """Forget which full-text indexes were ensured (tests that drop databases)."""
    _fulltext.clear()


# -- storages and sessions dropped without finalize ----------------------------------------

#: Where a storage was initialised: the code and line, formatted only when reported.
_Site = tuple[CodeType, int] | None

_SKIPPED = tuple(
    os.path.dirname(module.__file__ or "")
    for module in (sys.modules["neopool"], asyncio, sys.modules["lightrag"])
)


def _initialised_at() -> _Site:
    """The first frame outside neopool, asyncio and lightrag: the user's call."""
    frame = sys._getframe(1)
    while frame is not None:
        if not frame.f_code.co_filename.startswith(_SKIPPED):
            return frame.f_code, frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _site_text(site: _Site) -> str:
    if site is None:
        return "<unknown>"
    code, line = site
    return f"{code.co_filename}:{line} in {code.co_name}"


class _Dropped:
    """Storages and sessions collected without being ended, said in one line per batch.

    Weakref callbacks may run inside any allocation on any thread, so they only
    note what happened (a deque append is atomic) and ask the storage's loop to
    report it; the report is rate-limited (contract rule 8).
    """

    def __init__(self) -> None:
        self.pending: collections.deque[tuple[str, _Site]] = collections.deque()
        self.lock = threading.Lock()
        self.limiter = SayOnce()
        #: Storages and open sessions reported (or counted) so far, for tests and stats.
        self.storages = 0
        self.sessions = 0


_dropped = _Dropped()


def _storage_dropped(site: _Site, loop: weakref.ref[asyncio.AbstractEventLoop], pid: int) -> None:
    _dropped.pending.append(("storage", site))
    _ask_loop_to_report(loop(), pid)


def _session_dropped(lease: PooledConnectionManager, site: _Site) -> None:
    """A session's lease whose holder was destroyed mid-session: give it back on its loop."""
    _dropped.pending.append(("session", site))
    pool = lease.pool
    loop = pool.loop
    try:
        if loop is None or loop.is_closed() or pool.pid != os.getpid():
            raise RuntimeError("the loop can never run this")
        loop.call_soon_threadsafe(_give_back, lease)
    except RuntimeError:
        pass  # the loop is gone (or the parent's): its pool released everything when it ended
    _ask_loop_to_report(loop, pool.pid)


def _give_back(lease: PooledConnectionManager) -> None:
    with contextlib.suppress(LeaseError):  # the pool ended meanwhile and accounted for it
        lease.mark_available()


def _ask_loop_to_report(loop: asyncio.AbstractEventLoop | None, pid: int) -> None:
    """Report on ``loop`` (the storage's, made in process ``pid``) soon; if it is gone, or
    is the parent's in a forked child, the next initialise reports."""
    if loop is None or loop.is_closed() or pid != os.getpid():
        return  # (an inherited loop's wake-up pipe is the parent's: nothing may be sent on it)
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(_report_dropped)


def _report_dropped() -> None:
    """Say what was dropped since the last report: one line, most frequent site first."""
    if not _dropped.pending or not _dropped.lock.acquire(blocking=False):
        return
    try:
        counts = {"storage": 0, "session": 0}
        sites: collections.Counter[str] = collections.Counter()
        while _dropped.pending:
            what, site = _dropped.pending.popleft()
            counts[what] += 1
            sites[_site_text(site)] += 1
        storages, sessions = counts["storage"], counts["session"]
        _dropped.storages += storages
        _dropped.sessions += sessions
        say = _dropped.limiter.occurred(storages + sessions)
        _dropped.limiter.cleared()
        if say is None:
            return
        dropped = [
            f"{storages} PooledNeo4JStorage instance(s) without finalize()" if storages else "",
            f"{sessions} session(s) still open" if sessions else "",
        ]
        logger.warning(
            "neopool: garbage-collected: %s; every lease they held is back in its pool. "
            "Storages initialised at: %s. Call 'await rag.finalize_storages()' in a finally "
            "block (and leave sessions with 'async with').%s",
            " and ".join(part for part in dropped if part),
            ", ".join(f"{site} ({n})" for site, n in sites.most_common(10)),
            say.note("dropped storages or sessions"),
        )
    finally:
        _dropped.lock.release()


def _after_fork_in_child() -> None:
    """The child's own counts and reports from zero (the parent's drops are the parent's
    to report), with fresh locks."""
    global _dropped, _races
    _fulltext.after_fork_in_child()
    _dropped = _Dropped()
    _races = _Races()


_fork.add_step(_fork.Step.LIGHTRAG, _after_fork_in_child)


def register() -> None:
    """Make ``LightRAG(graph_storage="PooledNeo4JStorage")`` resolve to this class.

    Safe to call more than once. Adds the name to LightRAG's storage registry
    and list of graph storages; it needs no environment variables of its own.
    """
    from lightrag import kg

    kg.STORAGES[STORAGE_NAME] = __name__
    implementations = kg.STORAGE_IMPLEMENTATIONS["GRAPH_STORAGE"]["implementations"]
    if STORAGE_NAME not in implementations:
        implementations.append(STORAGE_NAME)
    kg.STORAGE_ENV_REQUIREMENTS.setdefault(STORAGE_NAME, [])


__all__ = [
    "STORAGE_NAME",
    "LeasedDriver",
    "LeasedSession",
    "PooledNeo4JStorage",
    "lightrag_config",
    "lost_races_retried",
    "register",
]
