"""One event loop's pool: its driver, its leases, and the borrowers waiting.

Everything here runs on the pool's own loop. State changes happen in small
synchronous methods (``_acquire_nowait``, ``_release``, ``_expire``), so there is
no await between checking and changing state and a cancellation can never land
half-way; only opening and closing the driver awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from neo4j import AsyncDriver, AsyncGraphDatabase
from neo4j.exceptions import DriverError, ServiceUnavailable, SessionExpired

from neopool._orphans import driver_is_closed, release_orphaned_driver
from neopool.errors import LeaseError, NoRunningLoop, PoolClosed, PoolTimeout
from neopool.lease import PooledConnectionManager
from neopool.stats import PoolStats, UtilisationMonitor

if TYPE_CHECKING:
    from neopool.config import Neo4jConnectionConfig

logger = logging.getLogger("neopool")

DriverFactory = Callable[["Neo4jConnectionConfig"], AsyncDriver]

#: Errors after which the driver is checked before the next borrow.
CONNECTIVITY_ERRORS = (ServiceUnavailable, SessionExpired, ConnectionError)


def create_driver(config: Neo4jConnectionConfig) -> AsyncDriver:
    """The driver neopool opens for each loop: the official one, as configured."""
    return AsyncGraphDatabase.driver(config.uri, auth=config.auth(), **config.driver_options())


class EventLoopConnectionPool:
    """Leases on one event loop's driver, at most ``pool_max_size`` at a time.

    Borrowers beyond that wait first-in first-out until a lease comes back or
    ``borrow_timeout`` passes (:class:`PoolTimeout`). The driver is opened on
    the first borrow, verified (a wrong password fails there, once, with the
    driver's ``AuthError``) and warmed to ``pool_min_size`` sockets.
    """

    def __init__(
        self,
        config: Neo4jConnectionConfig,
        loop_id: str | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        driver_factory: DriverFactory = create_driver,
        on_closed: Callable[[EventLoopConnectionPool], None] | None = None,
    ) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # bound to the loop of the first borrow
        self.config = config
        self.max_size = config.pool_max_size
        self.min_size = config.pool_min_size
        self._loop = loop
        self._loop_id = loop_id or (str(id(loop)) if loop is not None else "")
        self._driver_factory = driver_factory
        self._on_closed = on_closed
        self._thread = threading.current_thread().name
        #: ``time.monotonic()`` when the pool was made: its age tells a churned loop.
        self.created_at = time.monotonic()

        self._available: list[PooledConnectionManager] = []
        self._in_use: set[PooledConnectionManager] = set()
        self._waiters: deque[asyncio.Future[PooledConnectionManager]] = deque()
        self._lease_count = 0

        self._driver: AsyncDriver | None = None
        self._driver_task: asyncio.Task[None] | None = None
        self._driver_suspect = False
        self._retired: list[AsyncDriver] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._teardown: AsyncIterator[None] | None = None

        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None

        self._borrows = 0
        self._timeouts = 0
        self._drivers_created = 0
        self._wait_ms_total = 0.0
        self._max_wait_ms = 0.0
        self._monitor = UtilisationMonitor(self._loop_id, config.utilisation_warning, self.max_size)

        for _ in range(self.min_size):
            self._available.append(self._new_lease())

    # -- what it is --------------------------------------------------------------
    @property
    def loop_id(self) -> str:
        """The id of the pool's event loop, as shown in stats."""
        return self._loop_id

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this pool belongs to (``None`` until first used)."""
        return self._loop

    @property
    def closed(self) -> bool:
        """Whether the pool was closed and lends no more."""
        return self._closed

    @property
    def driver(self) -> AsyncDriver | None:
        """The loop's driver, or ``None`` before the first borrow."""
        return self._driver

    @property
    def available(self) -> int:
        """Leases ready to hand out."""
        return len(self._available)

    @property
    def in_use(self) -> int:
        """Leases held by borrowers."""
        return len(self._in_use)

    @property
    def total(self) -> int:
        """Leases in existence: ``available + in_use``."""
        return len(self._available) + len(self._in_use)

    @property
    def waiting(self) -> int:
        """Borrowers waiting for a lease."""
        return len(self._waiters)

    @property
    def borrows(self) -> int:
        """Leases handed out since the pool was made."""
        return self._borrows

    def stats(self) -> PoolStats:
        """A snapshot of the pool's figures (safe to call from any thread)."""
        borrows = self._borrows
        return PoolStats(
            available=len(self._available),
            in_use=len(self._in_use),
            total=len(self._available) + len(self._in_use),
            max_size=self.max_size,
            min_size=self.min_size,
            waiting=len(self._waiters),
            borrows=borrows,
            timeouts=self._timeouts,
            drivers_created=self._drivers_created,
            wait_ms_total=round(self._wait_ms_total, 3),
            max_wait_ms=round(self._max_wait_ms, 3),
            reuse_ratio=round((borrows - self._drivers_created) / borrows, 4) if borrows else 0.0,
            thread=self._thread,
            closed=self._closed,
        )

    get_stats = stats

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<EventLoopConnectionPool loop={self._loop_id} {state} "
            f"in_use={len(self._in_use)} available={len(self._available)} "
            f"max={self.max_size} waiting={len(self._waiters)}>"
        )

    # -- borrowing ---------------------------------------------------------------
    async def borrow(self, timeout: float | None = None) -> PooledConnectionManager:
        """Take a lease, waiting up to ``timeout`` (default ``borrow_timeout``) for one."""
        self._check_loop("borrow a connection")
        deadline = self.config.borrow_timeout if timeout is None else _check_timeout(timeout)
        if not self._driver_ready():
            await self._ensure_driver()
        lease = self._acquire_nowait()
        if lease is None:
            lease = await self._wait(deadline)
        lease._record_borrow_site()
        return lease

    borrow_connection = borrow

    async def return_connection(
        self, lease: PooledConnectionManager, error: BaseException | None = None
    ) -> None:
        """Give a lease back. Nothing here awaits, so a cancellation cannot lose it.

        Pass the exception the borrower ended with, if any: after a
        connectivity error the driver is checked before the next borrow.
        """
        self.return_nowait(lease, error)

    def return_nowait(
        self, lease: PooledConnectionManager, error: BaseException | None = None
    ) -> None:
        """:meth:`return_connection` as the plain function it is: it never waits."""
        self._check_loop("return a connection")
        self._release(lease)
        if isinstance(error, CONNECTIVITY_ERRORS) and not self._closed:
            self._driver_suspect = True

    release = return_connection

    def _acquire_nowait(self) -> PooledConnectionManager | None:
        if self._closed:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        if self._waiters:
            return None  # first come, first served: no barging past waiters
        if self._available:
            lease = self._available.pop()
        elif len(self._in_use) < self.max_size:
            lease = self._new_lease()
        else:
            return None
        self._hand_out(lease)
        return lease

    def _hand_out(self, lease: PooledConnectionManager) -> None:
        lease._in_use = True
        self._in_use.add(lease)
        self._borrows += 1
        self._observe_utilisation()

    def _observe_utilisation(self) -> None:
        """Tell the monitor, where it could matter: above its threshold, or once alerted."""
        in_use, monitor = len(self._in_use), self._monitor
        if in_use > monitor.busy_above or monitor.alerted:
            monitor.observe(in_use)

    async def _wait(self, timeout: float) -> PooledConnectionManager:
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[PooledConnectionManager] = loop.create_future()
        self._waiters.append(waiter)
        self._monitor.exhausted(len(self._waiters))
        timer = loop.call_later(timeout, self._expire, waiter, timeout)
        started = time.perf_counter()
        try:
            return await waiter
        except asyncio.CancelledError:
            self._forget(waiter)
            raise
        finally:
            timer.cancel()
            waited_ms = (time.perf_counter() - started) * 1000.0
            self._wait_ms_total += waited_ms
            self._max_wait_ms = max(self._max_wait_ms, waited_ms)

    def _expire(self, waiter: asyncio.Future[PooledConnectionManager], timeout: float) -> None:
        if waiter.done():
            return
        waiting = len(self._waiters)
        self._waiters.remove(waiter)
        self._timeouts += 1
        waiter.set_exception(PoolTimeout(self._loop_id, self.max_size, waiting, timeout))

    def _forget(self, waiter: asyncio.Future[PooledConnectionManager]) -> None:
        """A waiting borrower was cancelled: pass on a lease it was just handed."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._release(waiter.result())
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self, lease: PooledConnectionManager) -> None:
        if not isinstance(lease, PooledConnectionManager):
            raise LeaseError(
                f"return_connection() takes the PooledConnectionManager that "
                f"borrow_connection() returned, not {type(lease).__name__}"
            )
        if lease._pool is not self:
            raise LeaseError(
                f"{lease!r} belongs to the pool of event loop {lease.loop_id}, not to "
                f"this one (event loop {self._loop_id}); return it to the pool it came from"
            )
        try:
            self._in_use.remove(lease)
        except KeyError:
            raise LeaseError(
                f"{lease!r} was already returned; return each lease exactly once"
            ) from None
        lease._in_use = False
        if self._closed:
            if not self._in_use and self._drained is not None:
                self._drained.set()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._hand_out(lease)
                waiter.set_result(lease)
                return
        self._available.append(lease)
        self._observe_utilisation()
        if self._retired and not self._in_use:
            self._spawn(self._close_retired())

    def _new_lease(self) -> PooledConnectionManager:
        self._lease_count += 1
        return PooledConnectionManager(self, self._lease_count)

    # -- the driver --------------------------------------------------------------
    def _current_driver(self) -> AsyncDriver:
        if self._closed:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        assert self._driver is not None, "a lease is only handed out once the driver is open"
        return self._driver

    async def get_driver(self) -> AsyncDriver:
        """The loop's driver, opened if needed (without taking a lease)."""
        self._check_loop("get the driver")
        if not self._driver_ready():
            await self._ensure_driver()
        return self._current_driver()

    def _driver_ready(self) -> bool:
        """Whether the driver can be lent as it is: open, unsuspected, not closed by a user."""
        driver = self._driver
        return driver is not None and not self._driver_suspect and not driver_is_closed(driver)

    async def _ensure_driver(self) -> None:
        """Open (or check) the driver once, however many borrowers ask at once."""
        if self._closed:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        task = self._driver_task
        if task is None:
            if self._teardown is None:
                await self._watch_loop_teardown()
            task = self._driver_task = asyncio.ensure_future(self._open_driver())
            task.add_done_callback(self._driver_task_done)
        await asyncio.shield(task)

    def _driver_task_done(self, task: asyncio.Task[None]) -> None:
        self._driver_task = None
        if not task.cancelled():
            task.exception()  # retrieved here; every borrower awaiting it sees it too

    async def _open_driver(self) -> None:
        old = self._driver
        if old is not None:
            try:
                await asyncio.wait_for(old.verify_connectivity(), self.config.connection_timeout)
            except (*CONNECTIVITY_ERRORS, DriverError, OSError, asyncio.TimeoutError) as exc:
                logger.info(
                    "neopool: driver of event loop %s failed its check (%s); opening a new one",
                    self._loop_id,
                    type(exc).__name__,
                )
            else:
                self._driver_suspect = False
                return
        driver = self._driver_factory(self.config)
        try:
            await self._warm(driver)
        except BaseException:
            await self._close_driver(driver)
            raise
        if self._closed:
            await self._close_driver(driver)
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        self._driver = driver
        self._drivers_created += 1
        self._driver_suspect = False
        if old is not None:
            self._retired.append(old)
            if not self._in_use:
                self._spawn(self._close_retired())
        logger.debug("neopool: opened driver for event loop %s", self._loop_id)

    async def _warm(self, driver: AsyncDriver) -> None:
        """Verify the driver and open ``pool_min_size`` sockets side by side."""
        checks = [driver.verify_connectivity() for _ in range(max(1, self.min_size))]
        results = await asyncio.wait_for(
            asyncio.gather(*checks, return_exceptions=True),
            self.config.connection_timeout + self.config.connection_acquisition_timeout,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _close_driver(self, driver: AsyncDriver) -> None:
        """Close a driver within ``close_timeout``; past that, drop its sockets."""
        try:
            await asyncio.wait_for(driver.close(), self.config.close_timeout or None)
        except Exception as exc:  # a dead server must not stop a close
            logger.debug("neopool: closing a driver failed (%r); dropping its sockets", exc)
            release_orphaned_driver(driver)

    async def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for driver in retired:
            await self._close_driver(driver)

    def _spawn(self, coro: object) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the loop ------------------------------------------------------------------
    def _check_loop(self, action: str) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            raise NoRunningLoop(
                f"cannot {action}: no event loop is running in this thread; "
                f"call it from async code (or through neopool.run)"
            ) from None
        if running is not self._loop:
            if self._loop is None:
                self._loop = running
                self._loop_id = self._loop_id or str(id(running))
                return
            raise LeaseError(
                f"cannot {action} on the pool of event loop {self._loop_id} from event "
                f"loop {id(running)}: a driver's sockets belong to the loop that opened "
                f"them. Borrow from the running loop's own pool instead "
                f"(GlobalNeo4jConnectionPool().borrow_connection())."
            )

    async def _watch_loop_teardown(self) -> None:
        """Close this pool when the loop shuts down its async generators.

        ``asyncio.run`` and ``asyncio.Runner`` do that just before closing the
        loop, after cancelling every task; so the driver is closed gracefully,
        on its own loop, while that loop can still run it.
        """
        sentinel = _teardown_sentinel(self)
        await sentinel.__anext__()  # first iteration registers it with the loop
        self._teardown = sentinel

    # -- closing -----------------------------------------------------------------
    async def close(self, timeout: float | None = None) -> None:
        """Stop lending, wait up to ``timeout`` for borrowed leases, close the driver.

        Waiting borrowers get :class:`PoolClosed` at once. Leases still out
        after ``timeout`` (default ``close_timeout``) are reported as leaks with
        where they were borrowed. Safe to call twice and to cancel: the close
        itself runs to the end.
        """
        self._check_loop("close the pool")
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(
                self._close(self.config.close_timeout if timeout is None else timeout)
            )
        await asyncio.shield(self._close_task)

    aclose = close

    async def _close(self, timeout: float) -> None:
        self._stop_lending()
        if self._in_use and timeout > 0:
            self._drained = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        self._report_leaks()
        if self._driver_task is not None:
            self._driver_task.cancel()
            await asyncio.gather(self._driver_task, return_exceptions=True)
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        drivers = [d for d in (self._driver, *self._retired) if d is not None]
        self._retired = []
        for driver in drivers:
            await self._close_driver(driver)
        self._finish_teardown()

    def _stop_lending(self) -> None:
        if self._closed:
            return
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(
                    PoolClosed(f"the pool of event loop {self._loop_id} was closed while waiting")
                )
        if self._on_closed is not None:
            self._on_closed(self)

    def _report_leaks(self) -> None:
        for lease in self._in_use:
            logger.warning(
                "neopool: %r was never returned before its pool closed; it was "
                "borrowed at %s. Return connections with 'async with' or in a finally block.",
                lease,
                lease.borrowed_at or "<unknown>",
            )

    def _finish_teardown(self) -> None:
        """Finish the teardown sentinel here, so nothing is left for a finalizer."""
        sentinel, self._teardown = self._teardown, None
        if sentinel is None:
            return
        closer = sentinel.aclose()  # type: ignore[attr-defined]
        try:
            closer.send(None)
        except StopIteration:
            pass
        except RuntimeError:
            pass  # it is the one running this close: it ends by itself
        else:
            closer.close()

    def abandon(self, *, report_leaks: bool = True) -> int:
        """Release everything without awaiting, for a loop that can no longer run.

        Used when the loop was closed without teardown, and in a forked child
        (where nothing may be sent on the parent's sockets). Returns how many
        sockets were released.
        """
        self._closed = True
        self._waiters = deque()  # futures of a dead loop: setting them would schedule on it
        if report_leaks:
            self._report_leaks()
        released = 0
        for driver in (self._driver, *self._retired):
            if driver is not None:
                released += release_orphaned_driver(driver)
        self._retired = []
        self._finish_teardown()
        return released


def _check_timeout(timeout: float) -> float:
    """A borrow timeout, checked before any state changes (a bad one must not strand a waiter)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return float(timeout)


async def _teardown_sentinel(pool: EventLoopConnectionPool) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if not pool.closed:  # the loop is shutting down: close while it still runs
            await pool.close(timeout=0)
