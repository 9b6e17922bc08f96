"""The process-wide registry: one pool per event loop, and the one place that ends pools.

Pools are keyed by the loop object itself, not by ``id(loop)`` (an id is reused
once its loop is collected), and weakly: the loop holds its pool, the registry
only refers to it, so a loop the program dropped is collected with its pool
and driver. A pool whose end has begun is held here until it is finished.

How a pool ends depends on its loop, and :meth:`GlobalNeo4jConnectionPool.end_pool`
is the one place that decides it (``close_all_pools``, sweeps of dead loops,
Celery's hooks and the testing reset all go through it):

=====================  ======================================================
the pool's loop        how the pool ends
=====================  ======================================================
running here           ``close(timeout)``, awaited by the caller
running elsewhere      ``close(timeout)`` on that loop; the caller waits at
                       most ``timeout``
idle, the runner's     ``close(timeout)`` run on it by the runner, bounded
idle, someone else's   ``close`` queued for when it runs next; a sweep
                       terminates it if the loop dies first
closed, its thread     ``terminate()``: sockets released, nothing sent
ended, or inherited
through fork
=====================  ======================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Protocol

from neopool import _fork
from neopool._ending_thread import run_off_ending_thread
from neopool.config import DEFAULT_CLOSE_TIMEOUT, Neo4jConnectionConfig
from neopool.errors import ConfigError, LeaseError, NoRunningLoop
from neopool.lease import PooledConnectionManager
from neopool.loop_pool import DriverFactory, EventLoopConnectionPool, PoolState, create_driver
from neopool.stats import PROCESS, LoopChurnMonitor, PoolStats, ProcessTotals

__all__ = ["GlobalNeo4jConnectionPool", "LoopReach"]

logger = logging.getLogger("neopool")

#: A pool's end under way: awaitable on the running loop, or a future from another thread.
Ending = asyncio.Future[None] | concurrent.futures.Future[None]

#: What ends a pool whose loop can never run again, as the warning about leases in use says it.
_CANNOT_RUN = "the registry: its event loop can never run again (closed, or its thread ended)"


class LoopHost(Protocol):
    """Who runs loops the registry does not (neopool's runner): told through
    :func:`set_loop_host`, so the pool layer never imports the runner."""

    def owns(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``loop`` is the host's (it then closes it when its thread ends)."""
        ...

    def run_on_idle_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Callable[[], Coroutine[Any, Any, None]],
        timeout: float,
    ) -> concurrent.futures.Future[None] | None:
        """Run ``work()`` on the host's idle ``loop`` within ``timeout``; ``None`` if not."""
        ...


class _NoHost:
    def owns(self, loop: asyncio.AbstractEventLoop) -> bool:
        return False

    def run_on_idle_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Callable[[], Coroutine[Any, Any, None]],
        timeout: float,
    ) -> concurrent.futures.Future[None] | None:
        return None


_loop_host: LoopHost = _NoHost()


def set_loop_host(host: LoopHost) -> None:
    """Tell the registry about the loops ``host`` runs (the runner does, at import)."""
    global _loop_host
    _loop_host = host


def sweep() -> int:
    """Terminate the pools whose loops can never run again, if the registry exists;
    return how many (a loop's owner calls it once it closed the loop)."""
    registry = GlobalNeo4jConnectionPool._instance
    return registry.sweep() if registry is not None else 0


class LoopReach(enum.Enum):
    """What a pool's loop can still do, as seen from the calling thread.

    :meth:`GlobalNeo4jConnectionPool.end_pool` ends the pool by it: closed on its
    loop while that loop can run, terminated when it never can. Not the runner's
    ``LoopState``, which is where one of its loops is in its life.
    """

    CURRENT = "running in this thread"
    RUNNING = "running in another thread"
    IDLE = "idle"
    CLOSED = "closed"
    THREAD_ENDED = "idle, and its thread has ended"
    INHERITED = "inherited through fork"

    @property
    def can_run(self) -> bool:
        """Whether the loop may ever run again (if not, only terminate() is left)."""
        return self in (LoopReach.CURRENT, LoopReach.RUNNING, LoopReach.IDLE)


#: A thread's recent pool: the registry's generation when found, and the pool, weakly.
_Recent = tuple[int, "weakref.ref[EventLoopConnectionPool]"]


class GlobalNeo4jConnectionPool:
    """The registry of every event loop's pool in this process.

    ``GlobalNeo4jConnectionPool()`` always returns the same object and never
    resets it. After ``fork`` the child starts with an empty registry; the
    pools it inherited are terminated without a byte sent on their sockets, so
    the parent's connections keep working.
    """

    _instance: ClassVar[GlobalNeo4jConnectionPool | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    _lock: threading.Lock
    _pools: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, weakref.ref[EventLoopConnectionPool]
    ]
    #: Per thread, the pool it last borrowed from (weakly), with the :attr:`_generation`
    #: it was found in: the borrow path's first look.
    _recent: threading.local
    #: Counts pools leaving the registry: a recent pool from an earlier count is looked up again.
    _generation: int
    _ending: set[EventLoopConnectionPool]
    _ended_threads: weakref.WeakSet[threading.Thread]
    _config: Neo4jConnectionConfig | None
    _driver_factory: DriverFactory
    _pid: int
    _churn: LoopChurnMonitor

    def __new__(cls) -> GlobalNeo4jConnectionPool:
        instance = cls._instance
        if instance is None:
            with cls._instance_lock:
                instance = cls._instance
                if instance is None:
                    instance = super().__new__(cls)
                    instance._lock = threading.Lock()
                    instance._pools = weakref.WeakKeyDictionary()
                    instance._recent = threading.local()
                    instance._generation = 0
                    instance._ending = set()
                    instance._ended_threads = weakref.WeakSet()
                    instance._config = None
                    instance._driver_factory = create_driver
                    instance._pid = os.getpid()
                    instance._churn = LoopChurnMonitor()
                    cls._instance = instance
        return instance

    # -- configuration -----------------------------------------------------------
    @classmethod
    def set_config(cls, config: Neo4jConnectionConfig) -> None:
        """Use ``config`` for every pool created from now on.

        Pools that already exist keep the configuration they were made with
        until they close (``close_all_pools``).
        """
        if not isinstance(config, Neo4jConnectionConfig):
            raise ConfigError(
                f"set_config() takes a Neo4jConnectionConfig, not {type(config).__name__}"
            )
        registry = cls()
        with registry._lock:
            registry._config = config
        live = len(registry.pools())
        if live:
            logger.info(
                "neopool: new configuration set; %d existing pool(s) keep the old one until closed",
                live,
            )

    @classmethod
    def set_config_if_unset(cls, make: Callable[[], Neo4jConnectionConfig]) -> None:
        """Use ``make()`` unless a configuration was set (or read) already.

        For an integration with defaults of its own (LightRAG's ``config.ini``):
        what the application set wins, and ``make`` is then not even called.
        """
        registry = cls()
        if registry._config is not None:
            return
        config = make()
        if not isinstance(config, Neo4jConnectionConfig):
            raise ConfigError(
                f"set_config_if_unset() needs a Neo4jConnectionConfig, not {type(config).__name__}"
            )
        with registry._lock:
            if registry._config is None:
                registry._config = config

    @classmethod
    def get_config(cls) -> Neo4jConnectionConfig:
        """The configuration in use, read from the environment if none was set."""
        registry = cls()
        config = registry._config
        if config is None:
            try:
                config = Neo4jConnectionConfig()
            except ConfigError as exc:
                raise ConfigError(
                    f"no configuration was set and the environment does not give one: "
                    f"call GlobalNeo4jConnectionPool.set_config(Neo4jConnectionConfig(...)) "
                    f"or set the NEO4J_* variables.\n{exc}"
                ) from None
            with registry._lock:
                registry._config = registry._config or config
                config = registry._config
        return config

    @classmethod
    def set_driver_factory(cls, factory: DriverFactory = create_driver) -> None:
        """Build each loop's driver with ``factory(config)`` (for instrumentation)."""
        cls()._driver_factory = factory

    # -- pools -------------------------------------------------------------------
    async def get_pool(self) -> EventLoopConnectionPool:
        """The running event loop's pool, created on first use."""
        return self.running_loop_pool("get_pool")

    def running_loop_pool(self, action: str = "running_loop_pool") -> EventLoopConnectionPool:
        """:meth:`get_pool` without the ``await`` (it never waits), for the borrow path."""
        loop = asyncio._get_running_loop() or _running_loop(action)
        generation = self._generation
        recent: _Recent | None = getattr(self._recent, "pool", None)
        if recent is not None and recent[0] == generation:  # no pool left the registry since
            pool = recent[1]()
            if pool is not None and pool._loop is loop and pool._state is PoolState.OPEN:
                return pool  # the usual case, without a weak-key lookup (it makes a weakref)
        ref = self._pools.get(loop)
        pool = ref() if ref is not None else None
        if pool is None or pool.state is not PoolState.OPEN:
            pool = self._create_pool(loop)
        self._recent.pool = (generation, weakref.ref(pool))
        return pool

    def _create_pool(self, loop: asyncio.AbstractEventLoop) -> EventLoopConnectionPool:
        config = self.get_config()
        with self._lock:
            ref = self._pools.get(loop)
            pool = ref() if ref is not None else None
            if pool is None or pool.state is not PoolState.OPEN:
                pool = EventLoopConnectionPool(
                    config,
                    str(id(loop)),
                    loop=loop,
                    driver_factory=self._driver_factory,
                    on_closing=self._detach,
                    on_closed=self._pool_closed,
                )
                self._pools[loop] = weakref.ref(pool)
        if not _loop_host.owns(loop):  # the runner closes its own loops when their threads end
            _watch_thread_end(self)
        self.sweep()
        return pool

    def pools(self) -> list[EventLoopConnectionPool]:
        """Every lending pool of this process (a snapshot)."""
        with self._lock:
            refs = list(self._pools.values())
        return [pool for pool in (ref() for ref in refs) if pool is not None and not pool.closed]

    def _detach(self, pool: EventLoopConnectionPool) -> None:
        """A pool stops lending: it is no longer its loop's pool, and is held until it ends."""
        with self._lock:
            self._generation += 1  # every thread's recent pool is looked up again
            loop = pool.loop
            if loop is not None:
                ref = self._pools.get(loop)
                if ref is not None and ref() is pool:
                    del self._pools[loop]
            if pool.state is not PoolState.CLOSED:
                self._ending.add(pool)

    def _pool_closed(self, pool: EventLoopConnectionPool) -> None:
        with self._lock:
            self._ending.discard(pool)
        if pool.pid == os.getpid():  # a pool inherited through fork did not churn here
            self._churn.pool_ended(time.monotonic() - pool.created_at, pool.borrows)

    # -- how a pool ends -----------------------------------------------------------
    def loop_reach(self, pool: EventLoopConnectionPool) -> LoopReach:
        """What ``pool``'s loop can still do, seen from here."""
        loop = pool.loop
        if pool.pid != os.getpid():
            return LoopReach.INHERITED
        if loop is None or loop.is_closed():
            return LoopReach.CLOSED
        if pool.on_own_loop():
            return LoopReach.CURRENT
        if loop.is_running():
            return LoopReach.RUNNING
        if not pool.thread.is_alive() or pool.thread in self._ended_threads:
            return LoopReach.THREAD_ENDED
        return LoopReach.IDLE

    def end_pool(
        self, pool: EventLoopConnectionPool, timeout: float, reason: str | None = None
    ) -> Ending | None:
        """Begin ending ``pool`` the only way its loop allows; what to wait on, if anything.

        The one dispatcher: every path that ends pools comes here. ``reason``
        (what ends it) is named if leases were still in use.
        """
        if pool.state is PoolState.CLOSED:
            return None
        reach = self.loop_reach(pool)
        loop = pool.loop
        if not reach.can_run or loop is None:
            self._detach(pool)
            released = pool.terminate(reason=reason or _CANNOT_RUN)
            if released and reach is not LoopReach.INHERITED:
                logger.info(
                    "neopool: event loop %s was %s without closing its pool; released %d "
                    "socket(s) without I/O. Use asyncio.run, asyncio.Runner or neopool.run "
                    "so pools close gracefully.",
                    pool.loop_id,
                    "left" if reach is LoopReach.THREAD_ENDED else reach.value,
                    released,
                )
            return None
        self._detach(pool)
        if reach is LoopReach.CURRENT:
            return asyncio.ensure_future(pool.close(timeout, reason=reason))
        if reach is LoopReach.IDLE:
            ending = _loop_host.run_on_idle_loop(
                loop, lambda: pool.close(timeout, reason=reason), timeout
            )
            if ending is not None:
                return ending
        ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            loop.call_soon_threadsafe(_start_close, pool, timeout, ended, reason)
        except RuntimeError:  # it closed in the meantime
            return self.end_pool(pool, timeout, reason)
        # An idle loop that is not ours closes its pool when it runs next: nothing to wait for.
        return ended if reach is LoopReach.RUNNING else None

    def sweep(self) -> int:
        """Terminate the pools whose loops can never run again; return how many."""
        if self._pid != os.getpid():
            return 0  # a forked child before its fork hook ran: the hook does this
        with self._lock:
            refs = list(self._pools.values())
            candidates = [*self._ending, *(ref() for ref in refs)]
        ended = 0
        for pool in candidates:
            if pool is not None and not self.loop_reach(pool).can_run:
                self.end_pool(pool, 0)
                ended += 1
        return ended

    def _begin_ending_all(self, timeout: float, reason: str) -> list[Ending]:
        with self._lock:
            refs = list(self._pools.values())
            candidates = {*self._ending, *(ref() for ref in refs)}
        endings = []
        for pool in candidates:
            if pool is not None:
                ending = self.end_pool(pool, timeout, reason)
                if ending is not None:
                    endings.append(ending)
        return endings

    def _close_budget(self, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        config = self._config
        return config.close_timeout if config is not None else DEFAULT_CLOSE_TIMEOUT

    async def close_all_pools(self, timeout: float | None = None) -> None:
        """Close every pool, each as its loop allows, within ``timeout`` seconds in all.

        ``timeout`` defaults to ``close_timeout``. The running loop's pool and
        pools of loops running elsewhere are closed gracefully on their loops;
        an idle loop of :func:`neopool.run` is run once to close its pool;
        pools of closed or dead loops have their sockets released at once. A
        close that does not finish in time ends in ``terminate()``. Borrowing
        afterwards starts new pools.
        """
        budget = self._close_budget(timeout)
        endings = self._begin_ending_all(budget, "close_all_pools()")
        waits = [e if isinstance(e, asyncio.Future) else asyncio.wrap_future(e) for e in endings]
        if not waits:
            return
        done, _ = await asyncio.wait(waits, timeout=budget)
        for future in done:
            if not future.cancelled() and future.exception() is not None:
                logger.warning("neopool: closing a pool failed: %r", future.exception())

    def shutdown(self, timeout: float | None = None) -> None:
        """:meth:`close_all_pools` for synchronous code (worker shutdown, test teardown).

        Returns within ``timeout``. A pool of a loop running in this very thread
        (called from async code) is only started closing: await
        :meth:`close_all_pools` there instead.
        """
        budget = self._close_budget(timeout)
        endings = [
            e
            for e in self._begin_ending_all(budget, "shutdown()")
            if not isinstance(e, asyncio.Future)
        ]
        concurrent.futures.wait(endings, timeout=budget)

    # -- the note's borrow / return API ------------------------------------------
    async def borrow_connection(self, timeout: float | None = None) -> PooledConnectionManager:
        """Borrow a lease from the running loop's pool; return it with ``return_connection``."""
        return await self.running_loop_pool("borrow_connection").borrow(timeout)

    async def return_connection(
        self, connection: PooledConnectionManager, error: BaseException | None = None
    ) -> None:
        """Give back a lease from ``borrow_connection``."""
        if not isinstance(connection, PooledConnectionManager):
            raise LeaseError(
                f"return_connection() takes the PooledConnectionManager that "
                f"borrow_connection() returned, not {type(connection).__name__}"
            )
        connection.pool._return_nowait(connection, error)

    async def get_pool_stats(self) -> dict[str, PoolStats]:
        """``{loop id: stats}`` for every live event loop's pool in this process."""
        self.sweep()
        return {pool.loop_id: pool.stats() for pool in self.pools()}

    def process_totals(self) -> ProcessTotals:
        """What this process's pools have done since it started, gone ones included.

        Beside :meth:`get_pool_stats` (the live pools, one entry per loop):
        where each task makes its own loop, these counts show the loops and
        drivers that came and went. Needs no running loop.
        """
        return PROCESS.totals()

    # -- fork --------------------------------------------------------------------
    def after_fork_in_child(self) -> None:
        """Start empty; terminate what was inherited, without sending a byte.

        Every lock this takes, and ending a pool takes, is made anew first: a
        parent thread may have held one at the moment of the fork, and no
        thread of the child would ever release it.
        """
        self._lock = threading.Lock()
        self._churn = LoopChurnMonitor()
        self._pid = os.getpid()
        inherited = {*self._ending, *(ref() for ref in self._pools.values())}
        self._pools = weakref.WeakKeyDictionary()
        self._recent = threading.local()
        self._generation += 1
        self._ending = set()
        for pool in inherited:
            if pool is not None:
                pool.terminate()

    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    # The fork hook's step (neopool._fork runs it first), for the one registry if any.
    @classmethod
    def before_fork_step(cls) -> None:
        if cls._instance is not None:
            cls._instance.before_fork()

    @classmethod
    def after_fork_step_in_parent(cls) -> None:
        if cls._instance is not None:
            cls._instance.after_fork_in_parent()

    @classmethod
    def after_fork_step_in_child(cls) -> None:
        # First: ending the inherited pools counts under the totals' lock, which a
        # parent thread may have held at the fork.
        PROCESS.reset()
        cls._instance_lock = threading.Lock()
        if cls._instance is not None:
            cls._instance.after_fork_in_child()


def _start_close(
    pool: EventLoopConnectionPool,
    timeout: float,
    ended: concurrent.futures.Future[None],
    reason: str | None,
) -> None:
    """On the pool's loop: start its close; ``ended`` resolves when it has (however it ended)."""
    try:
        task = pool.start_close(timeout, reason=reason)
    except Exception as exc:  # reported to the waiting caller, not to the loop's handler
        ended.set_exception(exc)
        return
    if task is None or task.done():
        ended.set_result(None)
    else:
        task.add_done_callback(lambda _task: ended.set_result(None))


def _running_loop(action: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise NoRunningLoop(
            f"{action}() needs a running event loop: await it from async code "
            f"(or run it with neopool.run)"
        ) from None


#: How long an ending thread waits for the sweep after it (sweeps send nothing: quick).
_SWEEP_WAIT = 5.0


class _ThreadWatch:
    """Kept in a thread-local: collected when its thread ends, which sweeps that thread's loops."""

    __slots__ = ("__weakref__",)


_watch = threading.local()


def _watch_thread_end(registry: GlobalNeo4jConnectionPool) -> None:
    if getattr(_watch, "token", None) is not None:
        return
    token = _watch.token = _ThreadWatch()
    weakref.finalize(token, _thread_ended, registry, threading.current_thread())


def _thread_ended(registry: GlobalNeo4jConnectionPool, thread: threading.Thread) -> None:
    """A thread that made pools is ending: its idle loops can never run again."""

    def sweep() -> None:
        try:
            registry._ended_threads.add(thread)
            registry.sweep()
        except Exception:  # a finalizer must not raise
            logger.debug(
                "neopool: sweeping after thread %s ended failed", thread.name, exc_info=True
            )

    run_off_ending_thread(sweep, thread.ident, _SWEEP_WAIT)


_fork.add_step(
    _fork.Step.POOLS,
    GlobalNeo4jConnectionPool.after_fork_step_in_child,
    before=GlobalNeo4jConnectionPool.before_fork_step,
    in_parent=GlobalNeo4jConnectionPool.after_fork_step_in_parent,
)
