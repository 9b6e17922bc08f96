"""A stand-in for ``neo4j.AsyncDriver``, for fast state-machine tests of the pools' lifecycle.

This is a test double, not a mock of the database: it runs no query and opens
no socket. It has exactly what neopool's lifecycle code uses of a driver
(``await verify_connectivity()``, ``await close()`` and the ``_closed`` flag
that ``close()`` sets, as the real driver's does) and no ``_pool``, so socket
release finds nothing to release. Tests that need a server use the real
driver (``neopool.testing.plugin``); this one lets borrow / return / close /
terminate sequences run in milliseconds, thousands of times.

Pass a :class:`FakeDriverFactory` where neopool takes a driver factory::

    factory = FakeDriverFactory()
    pool = EventLoopConnectionPool(config, driver_factory=factory)
    GlobalNeo4jConnectionPool.set_driver_factory(factory)

Each driver can be told to hang or fail in ``verify_connectivity()`` or
``close()``. A hang waits on an :class:`asyncio.Event` until :meth:`FakeDriver.unblock`
(or until cancelled), never on a clock, so tests drive deadlines exactly.
Every driver records on which event loop it was made and any call made from
another loop (:attr:`FakeDriver.wrong_loop_calls`): a driver's sockets belong
to the loop that opened them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from neo4j import AsyncDriver

    from neopool.config import Neo4jConnectionConfig


class FakeDriver:
    """One fake driver: a ``verify_connectivity`` and a ``close`` that can hang or fail."""

    def __init__(self, config: Neo4jConnectionConfig, number: int) -> None:
        self.config = config
        #: Its place in its factory's :attr:`FakeDriverFactory.drivers` (1 for the first).
        self.number = number
        #: Set once ``close()`` was called and ran to the end or was cancelled, as the real one.
        self._closed = False
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        #: The event loop the driver was made on (the one its sockets would belong to).
        self.loop = loop
        self.thread = threading.current_thread()
        #: What the next calls do: hang until unblocked, or raise this exception.
        self.verify_hangs = False
        self.verify_error: BaseException | None = None
        self.close_hangs = False
        self.close_error: BaseException | None = None
        #: Counters of calls begun, and of closes that ran to the end without error.
        self.verify_calls = 0
        self.close_calls = 0
        self.closes_completed = 0
        #: Calls made while another event loop (or none) was running: each one is a bug.
        self.wrong_loop_calls: list[str] = []
        #: Set when a call begins: a test awaits them instead of sleeping.
        self.verify_started = asyncio.Event()
        self.close_started = asyncio.Event()
        self._unblocked = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called and finished (or was cancelled)."""
        return self._closed

    def unblock(self) -> None:
        """Let every hanging call go on (from any thread)."""
        loop = self.loop
        if loop is None or self._on_own_loop():
            self._unblocked.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._unblocked.set)

    async def verify_connectivity(self) -> None:
        self._note_loop("verify_connectivity")
        self.verify_calls += 1
        self.verify_started.set()
        if self.verify_hangs:
            await self._unblocked.wait()
        if self.verify_error is not None:
            raise self.verify_error

    async def close(self) -> None:
        self._note_loop("close")
        self.close_calls += 1
        self.close_started.set()
        if self._closed:
            return
        try:
            if self.close_hangs:
                await self._unblocked.wait()
        except asyncio.CancelledError:
            self._closed = True  # what the real driver does when its close is cancelled
            raise
        if self.close_error is not None:
            raise self.close_error
        self._closed = True
        self.closes_completed += 1

    def _on_own_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _note_loop(self, call: str) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is None:
            self.loop = running
        elif running is not self.loop:
            self.wrong_loop_calls.append(
                f"{call}() of driver #{self.number} from event loop {id(running)}, "
                f"not its own {id(self.loop)}"
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FakeDriver #{self.number} {state} loop={id(self.loop)}>"


class FakeDriverFactory:
    """Makes :class:`FakeDriver` objects, each behaving as the factory says at the time.

    Changing :attr:`verify_hangs`, :attr:`verify_error`, :attr:`close_hangs` or
    :attr:`close_error` here affects the drivers made from then on; change a
    driver's own attributes to affect only that one.
    """

    def __init__(
        self,
        *,
        verify_hangs: bool = False,
        verify_error: BaseException | None = None,
        close_hangs: bool = False,
        close_error: BaseException | None = None,
    ) -> None:
        self.verify_hangs = verify_hangs
        self.verify_error = verify_error
        self.close_hangs = close_hangs
        self.close_error = close_error
        self._lock = threading.Lock()
        #: Every driver made, in order (made from any thread).
        self.drivers: list[FakeDriver] = []

    def __call__(self, config: Neo4jConnectionConfig) -> AsyncDriver:
        with self._lock:
            driver = FakeDriver(config, len(self.drivers) + 1)
            driver.verify_hangs, driver.verify_error = self.verify_hangs, self.verify_error
            driver.close_hangs, driver.close_error = self.close_hangs, self.close_error
            self.drivers.append(driver)
        return cast("AsyncDriver", driver)

    def unblock_all(self) -> None:
        """Let every hanging call of every driver go on."""
        with self._lock:
            drivers = list(self.drivers)
        for driver in drivers:
            driver.unblock()
