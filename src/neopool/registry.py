"""The process-wide registry: one pool per event loop.

Pools are keyed by the loop object itself, not by ``id(loop)``: an id is reused
once its loop is collected, and a new loop must never be handed a dead loop's
pool. Holding the loop also means a loop that was closed without teardown is
still here to be found, and its sockets released, the next time any loop asks
for a pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import ClassVar

from neopool._orphans import retire_inherited_loop
from neopool.config import Neo4jConnectionConfig
from neopool.errors import ConfigError, LeaseError, NoRunningLoop
from neopool.lease import PooledConnectionManager
from neopool.loop_pool import DriverFactory, EventLoopConnectionPool, create_driver
from neopool.stats import LoopChurnMonitor, PoolStats

logger = logging.getLogger("neopool")


class GlobalNeo4jConnectionPool:
    """The registry of every event loop's pool in this process.

    ``GlobalNeo4jConnectionPool()`` always returns the same object and never
    resets it. After ``fork`` the child starts with an empty registry; the
    pools it inherited are released without a byte sent on their sockets, so the
    parent's connections keep working.
    """

    _instance: ClassVar[GlobalNeo4jConnectionPool | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    _lock: threading.Lock
    _pools: dict[asyncio.AbstractEventLoop, EventLoopConnectionPool]
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
                    instance._pools = {}
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
            live = len(registry._pools)
        if live:
            logger.info(
                "neopool: new configuration set; %d existing pool(s) keep the old one until closed",
                live,
            )

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
        loop = _running_loop(action)
        pool = self._pools.get(loop)
        if pool is None or pool.closed:
            pool = self._create_pool(loop)
        return pool

    def _create_pool(self, loop: asyncio.AbstractEventLoop) -> EventLoopConnectionPool:
        config = self.get_config()
        if self._pid != os.getpid():  # forked without our at-fork hook (should not happen)
            self._after_fork_in_child()
        with self._lock:
            dead = self._take_dead_pools()
            pool = self._pools.get(loop)
            if pool is None or pool.closed:
                pool = EventLoopConnectionPool(
                    config,
                    str(id(loop)),
                    loop=loop,
                    driver_factory=self._driver_factory,
                    on_closed=self._forget,
                )
                self._pools[loop] = pool
        for orphan in dead:
            released = self._release_dead(orphan)
            logger.info(
                "neopool: event loop %s was closed without closing its pool; "
                "released %d socket(s). Use asyncio.run, asyncio.Runner or neopool.run "
                "so pools close gracefully.",
                orphan.loop_id,
                released,
            )
        return pool

    def _take_dead_pools(self) -> list[EventLoopConnectionPool]:
        """Remove pools whose loop is closed (caller holds the lock)."""
        dead = [loop for loop in self._pools if loop.is_closed()]
        return [self._pools.pop(loop) for loop in dead]

    def _release_dead(self, pool: EventLoopConnectionPool) -> int:
        """Release a pool whose loop was closed under it; return how many sockets."""
        self._pool_ended(pool)
        return pool.abandon()

    def _forget(self, pool: EventLoopConnectionPool) -> None:
        """A pool began to close (on its loop): it lends no more."""
        with self._lock:
            if pool.loop is not None and self._pools.get(pool.loop) is pool:
                del self._pools[pool.loop]
        self._pool_ended(pool)

    def _pool_ended(self, pool: EventLoopConnectionPool) -> None:
        self._churn.pool_ended(time.monotonic() - pool.created_at, pool.borrows)

    def pools(self) -> list[EventLoopConnectionPool]:
        """Every live pool of this process (a snapshot)."""
        with self._lock:
            return list(self._pools.values())

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
        connection.pool.return_nowait(connection, error)

    async def get_pool_stats(self) -> dict[str, PoolStats]:
        """``{loop id: stats}`` for every live event loop's pool in this process."""
        with self._lock:
            dead = self._take_dead_pools()
            pools = list(self._pools.values())
        for orphan in dead:
            self._release_dead(orphan)
        return {pool.loop_id: pool.stats() for pool in pools}

    async def close_all_pools(self, timeout: float | None = None) -> None:
        """Close every pool, each on its own loop, and empty the registry.

        The running loop's pool is closed here. A pool whose loop runs in
        another thread is closed on that loop and awaited; one whose loop is idle
        closes the next time that loop runs (or at its teardown); one whose loop
        is closed has its sockets released at once. Borrowing afterwards starts
        new pools.
        """
        current = asyncio.get_running_loop()
        with self._lock:
            pools, self._pools = self._pools, {}
        waits: list[asyncio.Future[None]] = []
        for loop, pool in pools.items():
            if loop is current:
                waits.append(asyncio.ensure_future(pool.close(timeout)))
            elif loop.is_closed():
                self._release_dead(pool)
            elif loop.is_running():
                future = asyncio.run_coroutine_threadsafe(pool.close(timeout), loop)
                waits.append(asyncio.wrap_future(future))
            else:
                loop.call_soon_threadsafe(_close_later, pool, timeout)
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("neopool: closing a pool failed: %r", result)

    # -- fork --------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Start empty; release what was inherited without sending a byte."""
        self._lock = threading.Lock()
        inherited, self._pools = list(self._pools.values()), {}
        self._pid = os.getpid()
        for pool in inherited:
            pool.abandon(report_leaks=False)
            if pool.loop is not None:
                retire_inherited_loop(pool.loop)


def _close_later(pool: EventLoopConnectionPool, timeout: float | None) -> None:
    pool._spawn(pool.close(timeout))


def _running_loop(action: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise NoRunningLoop(
            f"{action}() needs a running event loop: await it from async code "
            f"(or run it with neopool.run)"
        ) from None


def _before_fork() -> None:
    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry._lock.acquire()


def _after_fork_in_parent() -> None:
    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry._lock.release()


def _after_fork_in_child() -> None:
    GlobalNeo4jConnectionPool._instance_lock = threading.Lock()
    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
