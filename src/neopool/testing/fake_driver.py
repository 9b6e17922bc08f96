"""A stand-in for ``neo4j.AsyncDriver``, for fast state-machine tests of the pools' lifecycle.

This is a test double, not a mock of the database: it runs no query and talks
to no server. It has exactly what neopool's lifecycle code uses of a driver
(``await verify_connectivity()``, ``await close()`` and the ``_closed`` flag
that ``close()`` sets, as the real driver's does). Tests that need a server use
the real driver (``neopool.testing.plugin``); this one lets borrow / return /
close / terminate sequences run in milliseconds, thousands of times.

Pass a :class:`FakeDriverFactory` where neopool takes a driver factory::

    factory = FakeDriverFactory()
    pool = EventLoopConnectionPool(config, driver_factory=factory)
    GlobalNeo4jConnectionPool.set_driver_factory(factory)

By default a fake driver has no ``_pool``, so neopool's socket release finds
nothing to release. With ``FakeDriverFactory(sockets=True)`` each driver holds
real sockets (one end of a local socket pair: no network) the way the real one
does, so a test can see them released (``driver_socket_count(driver) == 0``):
``verify_connectivity()`` connects one where no idle one is left (before it
hangs, as a handshake would), and ``close()`` first takes them all out of the
driver, then closes them once it is done (a cancelled or failed close leaves
them open, for neopool to release). They sit where the real driver keeps them
(``_pool.connections[address]``, each ``.socket._writer.transport``), the one
place neopool's ``_release`` looks.

Each driver can be told to hang or fail in ``verify_connectivity()`` or
``close()``. A hang waits on an :class:`asyncio.Event` until :meth:`FakeDriver.unblock`
(or until cancelled), never on a clock, so tests drive deadlines exactly.
Every driver records on which event loop it was made and any call made from
another loop (:attr:`FakeDriver.wrong_loop_calls`): a driver's sockets belong
to the loop that opened them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from neo4j import AsyncDriver

    from neopool.config import Neo4jConnectionConfig

#: The address every fake connection is filed under.
_ADDRESS = "fake:7687"


class FakeTransport(asyncio.BaseTransport):
    """A connection's transport: a real socket (one end of a local pair), closed or aborted."""

    def __init__(self) -> None:
        mine, other = socket.socketpair()
        other.close()  # no peer: nothing is ever sent
        super().__init__(extra={"socket": mine})
        self._sock = mine
        self._closing = False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._sock.close()

    def abort(self) -> None:
        self.close()

    def holds_socket(self) -> bool:
        """Whether its descriptor is an open socket still (released ones point elsewhere)."""
        fd = self._sock.fileno()
        try:
            return fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            return False


def _connection(transport: FakeTransport) -> SimpleNamespace:
    """A connection as the real driver files it: ``.socket._writer.transport``."""
    return SimpleNamespace(socket=SimpleNamespace(_writer=SimpleNamespace(transport=transport)))


class FakeDriver:
    """One fake driver: a ``verify_connectivity`` and a ``close`` that can hang or fail."""

    def __init__(self, config: Neo4jConnectionConfig, number: int, *, sockets: bool) -> None:
        self.config = config
        #: Its place in its factory's :attr:`FakeDriverFactory.drivers` (1 for the first).
        self.number = number
        #: Set once ``close()`` was called and ran to the end or was cancelled, as the real one.
        self._closed = False
        if sockets:  # where the real driver keeps its connections
            self._pool = SimpleNamespace(connections={_ADDRESS: []})
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
        #: Every transport the driver ever opened (``sockets=True``), open or not.
        self.transports: list[FakeTransport] = []
        #: Calls made while another event loop (or none) was running: each one is a bug.
        self.wrong_loop_calls: list[str] = []
        #: Set when a call begins: a test awaits them instead of sleeping.
        self.verify_started = asyncio.Event()
        self.close_started = asyncio.Event()
        self._unblocked = asyncio.Event()
        self._verifying = 0

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
        if self.verify_error is not None and not self.verify_hangs:
            raise self.verify_error  # refused: no connection was made
        self._verifying += 1
        try:
            connections = self._connections()
            if connections is not None and len(connections) < self._verifying:
                transport = FakeTransport()  # connected; the handshake may hang below
                self.transports.append(transport)
                connections.append(_connection(transport))
            if self.verify_hangs:
                await self._unblocked.wait()
            else:
                await asyncio.sleep(0)  # a check takes a turn of the loop: others overlap it
            if self.verify_error is not None:
                raise self.verify_error
        finally:
            self._verifying -= 1

    def open_sockets(self) -> int:
        """How many sockets it opened are open still: not closed, not released by neopool."""
        return sum(transport.holds_socket() for transport in self.transports)

    async def close(self) -> None:
        self._note_loop("close")
        self.close_calls += 1
        self.close_started.set()
        if self._closed:
            return
        connections = self._connections()
        taken = list(connections) if connections is not None else []
        if connections is not None:
            connections.clear()  # as the real one: out of the driver first, closed after
        try:
            if self.close_hangs:
                await self._unblocked.wait()
        except asyncio.CancelledError:
            self._closed = True  # what the real driver does when its close is cancelled
            raise
        if self.close_error is not None:
            raise self.close_error
        for connection in taken:
            connection.socket._writer.transport.close()
        self._closed = True
        self.closes_completed += 1

    def _connections(self) -> list[Any] | None:
        pool = getattr(self, "_pool", None)
        return None if pool is None else cast("list[Any]", pool.connections[_ADDRESS])

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
    driver's own attributes to affect only that one. ``sockets=True`` gives
    each driver real sockets to release (see the module's docstring).
    """

    def __init__(
        self,
        *,
        sockets: bool = False,
        verify_hangs: bool = False,
        verify_error: BaseException | None = None,
        close_hangs: bool = False,
        close_error: BaseException | None = None,
    ) -> None:
        self.sockets = sockets
        self.verify_hangs = verify_hangs
        self.verify_error = verify_error
        self.close_hangs = close_hangs
        self.close_error = close_error
        self._lock = threading.Lock()
        #: Every driver made, in order (made from any thread).
        self.drivers: list[FakeDriver] = []

    def __call__(self, config: Neo4jConnectionConfig) -> AsyncDriver:
        with self._lock:
            driver = FakeDriver(config, len(self.drivers) + 1, sockets=self.sockets)
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
