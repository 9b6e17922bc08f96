"""One event loop's pool: its driver, its leases, and the borrowers waiting.

Everything here runs on the pool's own loop, except :meth:`terminate`, which is
for a loop that can never run again. State changes happen in small synchronous
methods, so there is no await between checking and changing state and a
cancellation can never land half-way; only opening and closing drivers awaits.

A pool moves OPEN -> CLOSING -> CLOSED. The move to CLOSING happens in one
place, :meth:`_begin_close`: it stops lending, takes the waiters and drivers
out, and tells the registry once. There are two ways to finish:

* :meth:`close` drains leases and closes the drivers on the pool's own loop,
  within a deadline, shielded from the caller's cancellation;
* :meth:`terminate` releases the drivers' sockets without any I/O, for a loop
  that can never run again.

A close that fails, times out or is cancelled ends in :meth:`terminate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import os
import sys
import threading
import time
from asyncio import _get_running_loop
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from neo4j import AsyncDriver, AsyncGraphDatabase
from neo4j.exceptions import AuthError, DriverError, ServiceUnavailable, SessionExpired

from neopool._release import (
    close_driver,
    driver_is_closed,
    driver_transports,
    release_transports,
)
from neopool.credentials import credential_rejected, track
from neopool.errors import LeaseError, NoRunningLoop, PoolClosed, PoolTimeout
from neopool.lease import (
    BorrowSite,
    LeaseRef,
    PooledConnectionManager,
    caller_outside_package,
    outstanding,
)
from neopool.stats import PROCESS, PoolStats, UtilisationMonitor, report_leaks

if TYPE_CHECKING:
    from neopool.config import Neo4jConnectionConfig

logger = logging.getLogger("neopool")

DriverFactory = Callable[["Neo4jConnectionConfig"], AsyncDriver]

__all__ = ["DriverFactory", "EventLoopConnectionPool", "PoolState", "create_driver"]

#: Errors after which the driver is checked before the next borrow.
CONNECTIVITY_ERRORS = (ServiceUnavailable, SessionExpired, ConnectionError)

#: How often the loop's hold on its pool is renewed (it only has to outlive idle spells).
_ANCHOR_S = 86_400.0


def create_driver(config: Neo4jConnectionConfig) -> AsyncDriver:
    """The driver neopool opens for each loop: the official one, as configured.

    With a credentials provider, each driver gets an auth manager of its own
    (:meth:`Neo4jConnectionConfig.driver_auth`), which a borrower's ``AuthError``
    makes ask the provider again (:func:`neopool.credentials.credential_rejected`),
    and whose wait for the provider is bounded by ``connection_acquisition_timeout``.
    """
    auth = config.driver_auth()
    driver = AsyncGraphDatabase.driver(config.uri, auth=auth, **config.driver_options())
    track(driver, auth)
    return driver


class PoolState(enum.Enum):
    """Where a pool is in its life; it only ever moves forward."""

    OPEN = "open"  #: lends
    CLOSING = "closing"  #: lends no more; its drivers are being closed or released
    CLOSED = "closed"  #: nothing left: drivers closed or their sockets released


@dataclass
class _Retired:
    """A driver replaced after a connectivity error, closed once the leases of its time are back."""

    driver: AsyncDriver
    outstanding: set[int]
    back: asyncio.Event = field(default_factory=asyncio.Event)


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
        on_closing: Callable[[EventLoopConnectionPool], None] | None = None,
        on_closed: Callable[[EventLoopConnectionPool], None] | None = None,
    ) -> None:
        self.config = config
        self.max_size = config.pool_max_size
        self.min_size = config.pool_min_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_id = loop_id or ""
        self._driver_factory = driver_factory
        self._on_closing = on_closing
        self._on_closed = on_closed
        #: The thread that runs the loop; a loop whose thread ended while idle never runs again.
        self.thread = threading.current_thread()
        #: The process that made the pool; in a forked child the pool is inherited.
        self.pid = os.getpid()
        #: ``time.monotonic()`` when the pool was made: its age tells a churned loop.
        self.created_at = time.monotonic()
        self._state = PoolState.OPEN
        #: What closed the pool (``close_all_pools()``...), for the warning about leases in use.
        self._closed_by = ""
        self._anchor: asyncio.TimerHandle | None = None

        self._available: list[PooledConnectionManager] = []
        #: Leases held by borrowers, weakly: one whose holder is collected comes back.
        #: Each reference keeps where its borrow was made (its lease may be lost).
        self._in_use: dict[int, LeaseRef] = {}
        self._lost: list[int] = []
        self._waiters: deque[asyncio.Future[PooledConnectionManager]] = deque()
        self._lease_count = 0

        self._driver: AsyncDriver | None = None
        self._opening: AsyncDriver | None = None
        self._driver_task: asyncio.Task[None] | None = None
        self._driver_suspect = False
        self._retired: list[_Retired] = []
        #: Transports of drivers being closed: terminate() releases any still open.
        self._closing: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._teardown: AsyncGenerator[None, None] | None = None
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
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        if loop is not None:
            self._bind(loop)

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
    def state(self) -> PoolState:
        """OPEN, CLOSING or CLOSED."""
        return self._state

    @property
    def closed(self) -> bool:
        """Whether the pool lends no more (closing or closed)."""
        return self._state is not PoolState.OPEN

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
        borrows, created = self._borrows, self._drivers_created
        in_use, available = len(self._in_use), len(self._available)
        return PoolStats(
            available=available,
            in_use=in_use,
            total=available + in_use,
            max_size=self.max_size,
            min_size=self.min_size,
            waiting=len(self._waiters),
            borrows=borrows,
            timeouts=self._timeouts,
            drivers_created=created,
            wait_ms_total=round(self._wait_ms_total, 3),
            max_wait_ms=round(self._max_wait_ms, 3),
            reuse_ratio=round(max(0, borrows - created) / borrows, 4) if borrows else 0.0,
            thread=self.thread.name,
            closed=self.closed,
        )

    def __repr__(self) -> str:
        return (
            f"<EventLoopConnectionPool loop={self._loop_id} {self._state.value} "
            f"in_use={len(self._in_use)} available={len(self._available)} "
            f"max={self.max_size} waiting={len(self._waiters)}>"
        )

    # -- borrowing ---------------------------------------------------------------
    async def borrow(self, timeout: float | None = None) -> PooledConnectionManager:
        """Take a lease, waiting up to ``timeout`` (default ``borrow_timeout``) for one."""
        self._check_loop("borrow a connection")
        deadline = self.config.borrow_timeout if timeout is None else _check_timeout(timeout)
        lease = self._lend_now(sys._getframe(1))
        if lease is not None:
            return lease
        if not self._driver_ready():
            await self._ensure_driver()
        lease = self._acquire_nowait()
        if lease is None:
            lease = await self._wait(deadline)
        lease._ref.site = caller_outside_package(sys._getframe(1))
        return lease

    def _lend_now(self, caller: FrameType) -> PooledConnectionManager | None:
        """The whole borrow when nothing has to wait, or ``None`` (then :meth:`borrow` waits).

        A free lease of a driver that is ready, handed out at once: the usual case,
        in one step. ``caller`` is the borrowing frame (the borrow site is found from
        it). The caller runs on the pool's loop: it found the pool as the running
        loop's (:meth:`GlobalNeo4jConnectionPool.running_loop_pool`) or checked.
        """
        driver = self._driver
        if (
            driver is None
            or not self._available
            or self._waiters
            or self._lost
            or self._driver_suspect
            or self._state is not PoolState.OPEN
            or driver_is_closed(driver)
        ):
            return None
        lease = self._available.pop()
        self._hand_out(lease, caller_outside_package(caller))
        return lease

    async def return_connection(
        self, lease: PooledConnectionManager, error: BaseException | None = None
    ) -> None:
        """Give a lease back. Nothing here awaits, so a cancellation cannot lose it.

        Pass the exception the borrower ended with, if any: after a
        connectivity error the driver is checked before the next borrow; after
        an ``AuthError`` a credentials provider is asked again.
        """
        self._return_nowait(lease, error)

    def _return_nowait(
        self, lease: PooledConnectionManager, error: BaseException | None = None
    ) -> None:
        """:meth:`return_connection` as the plain function it is: it never waits.

        The one way a lease comes back (:meth:`PooledConnectionManager.mark_available`,
        ``BorrowedConnection`` and the registry's ``return_connection`` call it).
        """
        if error is None and _get_running_loop() is self._loop is not None:  # the usual case
            self._release(lease)
            return
        if error is None:
            self._check_loop("return a connection")
            self._release(lease)
            return
        if isinstance(error, GeneratorExit) and not self.on_own_loop():
            # The holder's coroutine is being closed away from the loop (its task was
            # collected, or its loop closed): it comes back the way a lost lease does.
            if lease._ref in outstanding:
                outstanding.discard(lease._ref)
                self._lease_lost(lease.lease_id)
            return
        self._check_loop("return a connection")
        self._release(lease)
        if isinstance(error, CONNECTIVITY_ERRORS) and self._state is PoolState.OPEN:
            self._driver_suspect = True
        elif isinstance(error, AuthError):
            credential_rejected(self._driver)  # a refused logon: the driver's manager never hears

    def _acquire_nowait(self) -> PooledConnectionManager | None:
        if self._state is not PoolState.OPEN:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        if self._lost:
            self._reclaim_lost()
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

    def _hand_out(self, lease: PooledConnectionManager, site: BorrowSite | None = None) -> None:
        """Lend ``lease``; ``site`` is where its borrow was made (a borrower that waited
        records its own once woken: never the last borrower's)."""
        lease._in_use = True
        lease._ref.site = site
        in_use = self._in_use
        in_use[lease.lease_id] = lease._ref
        outstanding.add(lease._ref)
        self._borrows += 1
        PROCESS.borrows += 1
        # The monitor hears only where it could matter: above its threshold, or once alerted.
        monitor = self._monitor
        if len(in_use) > monitor.busy_above or monitor.alerted:
            monitor.observe(len(in_use))

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
            self._withdraw(waiter)
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

    def _withdraw(self, waiter: asyncio.Future[PooledConnectionManager]) -> None:
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
        ref = self._in_use.pop(lease.lease_id, None)
        if ref is None:
            raise LeaseError(f"{lease!r} was already returned; return each lease exactly once")
        outstanding.discard(ref)
        lease._in_use = False
        self._lease_came_back(lease.lease_id)
        if self._state is PoolState.OPEN:
            self._pass_on(lease)

    def _lease_came_back(self, lease_id: int) -> None:
        """What waits for leases back (a retired driver, a close) hears of one returned or lost."""
        if not (self._retired or self._drained is not None) or not self.on_own_loop():
            return  # nothing waits, or a lost lease of a dead loop: nothing can
        for retired in self._retired:
            retired.outstanding.discard(lease_id)
            if not retired.outstanding:
                retired.back.set()
        if not self._in_use and self._drained is not None:
            self._drained.set()

    def _pass_on(self, lease: PooledConnectionManager) -> None:
        """Hand a free lease to the first live waiter, or shelve it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._hand_out(lease)
                waiter.set_result(lease)
                return
        self._available.append(lease)
        monitor = self._monitor
        if monitor.alerted:  # only falling utilisation is news here
            monitor.observe(len(self._in_use))

    def _new_lease(self) -> PooledConnectionManager:
        self._lease_count += 1
        return PooledConnectionManager(self, self._lease_count, self._lease_lost)

    # -- leases nobody returned ----------------------------------------------------
    def _lease_lost(self, lease_id: int) -> None:
        """A lease's holder was collected without returning it (a weakref callback).

        It may run inside any allocation on any thread, so it only notes the id
        and the pool's own loop reclaims it; where that loop can never run
        again, it is reclaimed here (nothing else touches this pool any more).
        """
        self._lost.append(lease_id)
        loop = self._loop
        try:
            if loop is None or loop.is_closed() or self.pid != os.getpid():
                # (an inherited loop's wake-up pipe is the parent's: nothing may be sent on it)
                raise RuntimeError("the loop can never run this")
            loop.call_soon_threadsafe(self._reclaim_lost)
        except RuntimeError:
            self._reclaim_lost()

    def _reclaim_lost(self) -> None:
        lost, self._lost = self._lost, []
        sites = []
        for lease_id in lost:
            ref = self._in_use.pop(lease_id, None)
            if ref is None:
                continue
            sites.append(ref.site)
            self._lease_came_back(lease_id)
            if self._state is PoolState.OPEN and self.on_own_loop():
                self._pass_on(self._new_lease())
        if sites:
            self._monitor.leases_lost([_site_text(site) for site in sites])

    def borrow_site(self, lease_id: int) -> str:
        """``file:line in function`` where lease ``lease_id`` was borrowed ("" if it is back)."""
        ref = self._in_use.get(lease_id)
        return "" if ref is None else _site_text(ref.site)

    # -- the driver --------------------------------------------------------------
    def _current_driver(self) -> AsyncDriver:
        """The driver a lease uses now (only valid while the pool lends)."""
        if self._state is not PoolState.OPEN:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        assert self._driver is not None, "a lease is only handed out once the driver is open"
        return self._driver

    async def get_driver(self) -> AsyncDriver:
        """The loop's driver, opened if needed, without taking a lease.

        Nothing bounds its use then: ``pool_max_size`` counts leases only. For
        a unit of work, borrow (``async with
        Neo4jConnectionFactory.borrow_connection()``) and use the lease's driver.
        """
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
        if self._state is not PoolState.OPEN:
            raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        task = self._driver_task
        if task is None:
            if self._teardown is None:
                await self._watch_loop_teardown()
            task = self._driver_task = self._spawn(self._open_driver())
            task.add_done_callback(self._driver_task_done)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _caller_cancelled():
                # The pool was closed under the borrower, which did not ask to stop.
                raise PoolClosed(
                    f"the pool of event loop {self._loop_id} was closed while opening its driver"
                ) from None
            raise

    def _driver_task_done(self, task: asyncio.Task[None]) -> None:
        self._driver_task = None
        if not task.cancelled():
            task.exception()  # retrieved here; every borrower awaiting it sees it too

    async def _open_driver(self) -> None:
        old = self._driver
        if old is not None and not driver_is_closed(old):
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
        driver = self._opening = self._driver_factory(self.config)
        try:
            await self._warm(driver)
            if self._state is not PoolState.OPEN:
                raise PoolClosed(f"the pool of event loop {self._loop_id} is closed")
        except GeneratorExit:
            # Finalized by the garbage collector, its loop gone: an await here would run on
            # whatever loop the collecting thread runs. The driver is terminate()'s to release.
            raise
        except BaseException:
            await self._close_driver(driver)
            self._opening = None  # only now: a close cut short leaves it to terminate
            raise
        self._opening = None
        self._driver = driver
        self._drivers_created += 1
        PROCESS.driver_created()
        self._driver_suspect = False
        if old is not None:
            self._retire(old)
        logger.debug("neopool: opened driver for event loop %s", self._loop_id)

    def _retire(self, driver: AsyncDriver) -> None:
        """Close a replaced driver once the leases out now are back, or after ``close_timeout``."""
        retired = _Retired(driver, set(self._in_use))
        if not retired.outstanding:
            retired.back.set()
        self._retired.append(retired)
        self._spawn(self._close_retired(retired))

    async def _close_retired(self, retired: _Retired) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(retired.back.wait(), self.config.close_timeout)
        await self._close_driver(retired.driver)
        with contextlib.suppress(ValueError):  # only now: a close cut short leaves it to terminate
            self._retired.remove(retired)

    async def _warm(self, driver: AsyncDriver) -> None:
        """Verify the driver and open ``pool_min_size`` sockets side by side.

        Every check is awaited to its end, even when this is cancelled, so no
        error is left unretrieved and no half-open socket unaccounted for.
        """
        checks = [self._spawn(driver.verify_connectivity()) for _ in range(max(1, self.min_size))]
        limit = self.config.connection_timeout + self.config.connection_acquisition_timeout
        try:
            _, pending = await asyncio.wait(checks, timeout=limit)
        except GeneratorExit:
            raise  # finalized by the garbage collector, its loop gone: nothing may be awaited
        except BaseException:
            await _cancel_and_wait(checks)
            raise
        await _cancel_and_wait(checks)
        for check in checks:
            error = None if check.cancelled() else check.exception()
            if error is not None:
                raise error
        if pending:
            raise asyncio.TimeoutError(f"the driver did not connect within {limit:g}s")

    async def _close_driver(self, driver: AsyncDriver) -> None:
        """Close a driver within ``close_timeout``; past that, release its sockets.

        Its transports are noted first: the driver forgets its connections as it
        closes them, and a loop that stops half-way leaves them to terminate().
        """
        transports = driver_transports(driver)
        self._closing.extend(transports)
        try:
            closing = self._spawn(close_driver(driver))  # one of ours: never left unstarted
            await asyncio.wait_for(closing, self.config.close_timeout or None)
        except Exception as exc:  # a dead server must not stop a close
            logger.debug("neopool: closing a driver failed (%r); releasing its sockets", exc)
            release_transports(transports, loop_runs=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task of the pool's own, outside any caller's context (so no call claims it)."""
        assert self._loop is not None
        task = contextvars.Context().run(self._loop.create_task, coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the loop ------------------------------------------------------------------
    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Belong to ``loop``: the loop holds the pool (the registry only refers to it)."""
        self._loop = loop
        self._loop_id = self._loop_id or str(id(loop))
        self._monitor = UtilisationMonitor(
            self._loop_id, self.config.utilisation_warning, self.max_size
        )
        self._anchor = loop.call_later(_ANCHOR_S, _renew_anchor, self)
        PROCESS.loop_served()

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
                self._bind(running)
                self.thread = threading.current_thread()
                return
            raise LeaseError(
                f"cannot {action} on the pool of event loop {self._loop_id} from event "
                f"loop {id(running)}: a driver's sockets belong to the loop that opened "
                f"them. Borrow from the running loop's own pool instead "
                f"(GlobalNeo4jConnectionPool().borrow_connection())."
            )

    def on_own_loop(self) -> bool:
        """Whether the caller runs on this pool's loop (where its futures may be touched)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _watch_loop_teardown(self) -> None:
        """Close this pool when the loop shuts down its async generators.

        ``asyncio.run`` and ``asyncio.Runner`` do that just before closing the
        loop, after cancelling every task; so the driver is closed gracefully,
        on its own loop, while that loop can still run it.
        """
        sentinel = _teardown_sentinel(self)
        await sentinel.__anext__()  # first iteration registers it with the loop
        self._teardown = sentinel

    # -- ending --------------------------------------------------------------------
    def _begin_close(self, reason: str | None) -> bool:
        """OPEN -> CLOSING, the one place it happens; ``False`` if it already had.

        Stops lending, takes the waiters out (failing them where their loop can
        still hear it) and tells the registry once. ``reason`` says what closed it.
        """
        if self._state is not PoolState.OPEN:
            return False
        self._state = PoolState.CLOSING
        self._closed_by = reason or ""
        waiters, self._waiters = self._waiters, deque()
        if self.on_own_loop():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(
                        PoolClosed(
                            f"the pool of event loop {self._loop_id} was closed while waiting"
                        )
                    )
        if self._on_closing is not None:
            self._on_closing(self)
        return True

    def _drivers(self) -> list[AsyncDriver]:
        """Every driver still to end: current, being opened, retired."""
        drivers = [self._driver, self._opening, *(r.driver for r in self._retired)]
        return [driver for driver in drivers if driver is not None]

    async def close(self, timeout: float | None = None, *, reason: str | None = None) -> None:
        """Stop lending, wait for borrowed leases, close the drivers: all within ``timeout``.

        ``timeout`` defaults to ``close_timeout``. Waiting borrowers get
        :class:`PoolClosed` at once; leases still out when it is time to close
        the drivers are reported with where they were borrowed. If the close
        fails, runs out of time or is cancelled, the pool is terminated (its
        sockets released without I/O). Safe to call twice and to cancel: the
        close itself runs to the end, on the pool's loop. ``reason`` (what is
        closing it, e.g. ``"close_all_pools()"``) is named in that report.
        """
        task = self.start_close(timeout, reason=reason)
        if task is not None and task is not asyncio.current_task():
            # Wait for it without taking its end as ours: a close task that was cancelled
            # ended the pool (in terminate), and only this caller's own cancellation raises.
            await asyncio.wait([task])

    def start_close(
        self, timeout: float | None = None, *, reason: str | None = None
    ) -> asyncio.Task[None] | None:
        """:meth:`close` without waiting: the task that finishes it (``None`` if never needed).

        Must run on the pool's loop; a second call returns the first one's task.
        """
        self._check_loop("close the pool")
        budget = self.config.close_timeout if timeout is None else _check_timeout(timeout)
        if self._close_task is None and self._state is not PoolState.CLOSED:
            self._begin_close(reason)
            self._close_task = self._spawn(self._finish_close(budget))
        return self._close_task

    async def _finish_close(self, budget: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            if self._in_use and budget > 0:
                self._drained = asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), budget / 2)
            me = asyncio.current_task()
            helpers = [task for task in self._tasks if task is not me]
            for task in helpers:
                task.cancel()
            closes = [self._spawn(self._close_driver(driver)) for driver in self._drivers()]
            if helpers or closes:
                _, pending = await asyncio.wait(
                    [*helpers, *closes], timeout=max(0.0, deadline - loop.time())
                )
                if pending:
                    for task in pending:
                        task.cancel()
                    raise asyncio.TimeoutError(f"{len(pending)} driver close(s) still running")
                for task in closes:
                    task.result()  # a driver that failed to close is released below
        except BaseException as exc:
            logger.debug("neopool: closing pool %s ended early (%r)", self._loop_id, exc)
            self.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self.terminate()  # every driver closed: this only records the end

    def terminate(self, *, reason: str | None = None) -> int:
        """End the pool now, without awaiting: release its drivers' sockets; return how many.

        For a loop that can never run again (closed without teardown, its
        thread gone, inherited through ``fork``), and as the end of a close that
        failed. Sends nothing on any socket. Safe to call twice and from any
        thread. ``reason`` is as for :meth:`close`.
        """
        self._begin_close(reason)
        if self._state is PoolState.CLOSED:
            return 0
        self._state = PoolState.CLOSED
        # On its own loop, in its own process, transports can be aborted the ordinary
        # way; anywhere else (a dead loop, a forked child) nothing may touch the loop.
        on_loop = self.pid == os.getpid() and self.on_own_loop()
        if not on_loop:
            self._waiters = deque()  # futures of a loop that cannot run: setting them would fail
        if not on_loop and self.pid == os.getpid():
            self._close_stranded_tasks()
        transports = {id(t): t for t in self._closing}
        for driver in self._drivers():
            transports.update((id(t), t) for t in driver_transports(driver))
        loop_closed = self.pid == os.getpid() and self._loop is not None and self._loop.is_closed()
        released = release_transports(
            list(transports.values()), loop_runs=on_loop, loop_closed=loop_closed
        )
        self._opening, self._retired, self._closing = None, [], []
        if self._in_use and self.pid == os.getpid():
            self._report_leaks()
        if self._anchor is not None and on_loop:
            self._anchor.cancel()
        self._anchor = None
        self._finish_teardown()
        PROCESS.pool_ended(self.pid, self._drivers_created)
        if self._on_closed is not None:
            self._on_closed(self)
        return released

    def _close_stranded_tasks(self) -> None:
        """Close the coroutines of this pool's tasks left pending on a loop that cannot run.

        Otherwise the garbage collector closes them later, wherever it runs, and
        the driver's cleanup inside them fails there and is printed as an
        exception ignored in a finalizer. Closed here, in a thread that runs no
        loop, whatever their cleanup raises is caught.
        """
        coroutines = [task.get_coro() for task in self._tasks if not task.done()]
        self._tasks = set()
        if not coroutines:
            return

        def close_them() -> None:
            for coroutine in coroutines:
                try:
                    coroutine.close()
                except BaseException as exc:  # their cleanup cannot reach a dead loop
                    logger.debug("neopool: closing a stranded task raised %r", exc)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            close_them()
            return
        closer = threading.Thread(target=close_them, name="neopool-release", daemon=True)
        try:
            closer.start()
        except RuntimeError:  # the interpreter is shutting down: no new thread
            return
        closer.join(1.0)

    def _report_leaks(self) -> None:
        if self._in_use:
            sites = [_site_text(ref.site) for ref in self._in_use.values()]
            report_leaks(self._loop_id, sites, closed_by=self._closed_by)

    def _finish_teardown(self) -> None:
        """Finish the teardown sentinel here, so nothing is left for a finalizer."""
        sentinel, self._teardown = self._teardown, None
        if sentinel is None:
            return
        closer = sentinel.aclose()
        try:
            closer.send(None)
        except StopIteration:
            pass
        except RuntimeError:
            pass  # it is the one running this close: it ends by itself
        else:
            closer.close()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` (a no-op for those done) and wait until each has ended."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)


def _renew_anchor(pool: EventLoopConnectionPool) -> None:
    if pool.state is PoolState.OPEN and pool.loop is not None:
        pool._anchor = pool.loop.call_later(_ANCHOR_S, _renew_anchor, pool)


def _caller_cancelled() -> bool:
    """Whether the running task itself was asked to stop (3.11+ can tell; 3.10 assumes not)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _site_text(site: BorrowSite | None) -> str:
    if site is None:
        return "<unknown>"
    code, line = site
    return f"{code.co_filename}:{line} in {code.co_name}"


def _check_timeout(timeout: float) -> float:
    """A timeout, checked before any state changes (a bad one must not strand a waiter)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return float(timeout)


#: What closes a pool when its loop shuts down, as the warning about leases in use says it.
_TEARDOWN = "the shutdown of its event loop (the end of asyncio.run or asyncio.Runner)"


async def _teardown_sentinel(pool: EventLoopConnectionPool) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        if pool.state is not PoolState.CLOSED:  # the loop is shutting down: close while it runs
            await pool.close(timeout=pool.config.close_timeout, reason=_TEARDOWN)
