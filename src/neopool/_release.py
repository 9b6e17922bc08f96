"""Letting go of a driver's sockets without I/O, for a loop that can never run again.

A driver is closed with ``await driver.close()`` on its own loop. When that loop
can never run again (it was closed without teardown, its thread ended while it
was idle, or it was inherited through ``fork``), nothing can be awaited any
more. Its sockets are released here instead, synchronously and without sending
a byte:

* each transport's socket is found through the public transport API
  (``get_extra_info("socket")``), which plain and TLS transports of asyncio and
  uvloop all answer;
* its descriptor is pointed at ``/dev/null`` with ``os.dup2``. This process's
  reference to the connection ends at once (after ``fork`` the parent still
  holds the socket, so nothing at all changes for it); the number stays
  allocated to ``/dev/null`` until the transport object that owns it is
  collected, so it can never be closed twice or reused under someone else.

The driver has no public list of its connections; this is the one place that
reads (never writes) the driver's private attributes to find them. A driver
version that differs leaves its sockets to the garbage collector, never an
exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any

from neo4j import AsyncDriver


def driver_transports(driver: AsyncDriver) -> list[asyncio.BaseTransport]:
    """The transports of the driver's connections now (the driver forgets them as it closes)."""
    return list(_transports(driver))


def _transports(driver: AsyncDriver) -> Iterator[asyncio.BaseTransport]:
    pool = getattr(driver, "_pool", None)
    connections: Any = getattr(pool, "connections", None) or {}
    with contextlib.suppress(RuntimeError):  # changed size: best effort
        for address in list(connections):
            for connection in list(connections.get(address, ())):
                writer = getattr(getattr(connection, "socket", None), "_writer", None)
                transport: Any = getattr(writer, "transport", None)
                # By what it answers, not its class: uvloop's transports (plain and
                # TLS) implement asyncio's transport API without subclassing it.
                if callable(getattr(transport, "get_extra_info", None)):
                    yield transport


def _descriptor(transport: asyncio.BaseTransport) -> int:
    """The socket's file descriptor, through the public transport API; -1 if none."""
    try:
        sock = transport.get_extra_info("socket")
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError, AttributeError):
        return -1


def driver_socket_count(driver: AsyncDriver) -> int:
    """How many sockets the driver holds open (for tests and stats).

    A released one is not counted: its descriptor now points at ``/dev/null``.
    """
    return sum(1 for transport in _transports(driver) if _is_socket(_descriptor(transport)))


def _is_socket(fd: int) -> bool:
    """Whether ``fd`` is an open socket (not closed, not released to ``/dev/null``)."""
    try:
        return fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def driver_is_closed(driver: AsyncDriver) -> bool:
    """Whether ``driver.close()`` was called (by anyone): it can open no session now."""
    return bool(getattr(driver, "_closed", False))


async def close_driver(driver: AsyncDriver) -> None:
    """``await driver.close()``, returning once its sockets are closed too.

    The driver closes a socket "in the background" (``writer.close()``, not
    awaited). A plain TCP transport is gone one loop iteration later, but a TLS
    transport first exchanges ``close_notify`` with the server, which takes a
    round trip on the loop: a loop closed in between (``asyncio.run`` right after
    its teardown closed the pool) leaves the TCP transport under the TLS one
    unclosed, for the garbage collector and a ``ResourceWarning``. So this waits
    until every transport the driver had says its socket is closed. Cancelled
    (its close ran out of time), it aborts what is still open, then re-raises.
    """
    transports = driver_transports(driver)
    await driver.close()
    open_ = [transport for transport in transports if _descriptor(transport) >= 0]
    try:
        while open_:  # no public event says a socket closed: look again shortly
            await asyncio.sleep(_SETTLE_POLL_S)
            open_ = [transport for transport in open_ if _descriptor(transport) >= 0]
    except asyncio.CancelledError:
        for transport in open_:
            abort = getattr(transport, "abort", None)
            if callable(abort):
                abort()
        raise


#: How often :func:`close_driver` looks whether the closed driver's sockets are closed.
_SETTLE_POLL_S = 0.002


def release_sockets(driver: AsyncDriver, *, loop_runs: bool = False) -> int:
    """Release this process's hold on the driver's sockets, sending nothing; return how many."""
    return release_transports(driver_transports(driver), loop_runs=loop_runs)


def release_transports(
    transports: list[asyncio.BaseTransport], *, loop_runs: bool = False, loop_closed: bool = False
) -> int:
    """Release the sockets under ``transports`` without I/O; return how many were open.

    ``loop_runs``: the caller is on the transports' loop (a close that failed or
    ran out of time), so each transport is aborted the ordinary way instead.
    ``loop_closed``: their loop is closed (in this process).
    """
    if loop_runs:
        open_ = [t for t in transports if not t.is_closing() or _descriptor(t) >= 0]
        for transport in open_:
            abort = getattr(transport, "abort", None)
            if callable(abort):
                abort()
        return len(open_)
    descriptors = {_descriptor(transport) for transport in transports}
    descriptors = {fd for fd in descriptors if _is_socket(fd)}
    if not descriptors:
        return 0
    released = 0
    null = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        for fd in descriptors:
            try:
                os.dup2(null, fd)
            except OSError:
                continue
            released += 1
    finally:
        os.close(null)
    if loop_closed and sys.version_info < (3, 11):
        _finish_tls_layers(transports)  # after: whatever it might write reaches no server
    return released


def _finish_tls_layers(transports: list[asyncio.BaseTransport]) -> None:
    """On Python 3.10, a TLS transport collected unclosed writes its close_notify, and
    on a closed loop that ends in "Fatal error on SSL transport" printed at exit.
    Aborted first, it is finished: the abort sends nothing (on a closed loop it stops
    where it would schedule the socket's close, the one step that raises) and the
    collector then has nothing to write."""
    for transport in transports:
        with contextlib.suppress(RuntimeError):  # "Event loop is closed", as expected
            transport.abort()  # type: ignore[attr-defined]


#: Loops this process inherited through ``fork``, kept so they are never closed
#: here: closing a copied selector loop unregisters its descriptors from the
#: epoll instance the child shares with its parent, which would deafen the
#: parent's loop.
_inherited_loops: list[asyncio.AbstractEventLoop] = []


def keep_inherited_loop(loop: asyncio.AbstractEventLoop) -> None:
    """In a forked child: hold a parent's loop for good, so its destructor never runs."""
    if not any(kept is loop for kept in _inherited_loops):
        _inherited_loops.append(loop)  # no lock: this runs in a fork hook, one thread
