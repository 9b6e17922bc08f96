"""Releasing a driver whose event loop can no longer run it.

A driver is closed with ``await driver.close()`` on its own loop. When that loop
was closed without giving the pool a chance (``loop.close()`` with no teardown,
the pattern of many Celery apps), nothing can be awaited any more: the sockets
would stay open until garbage collection and then warn. Here they are closed
synchronously instead, without sending a byte (after ``fork`` the same socket is
still the parent's, so the child must not even say goodbye on it).

This is the only module that reaches into the driver's and asyncio's private
attributes. Every step is best effort: a driver version that differs leaves its
sockets to the garbage collector, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from neo4j import AsyncDriver


def _transports(driver: AsyncDriver) -> Iterator[Any]:
    pool = getattr(driver, "_pool", None)
    connections = getattr(pool, "connections", None) or {}
    for address in list(connections):
        for connection in list(connections.get(address, ())):
            writer = getattr(getattr(connection, "socket", None), "_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is not None:
                yield transport


def driver_socket_count(driver: AsyncDriver) -> int:
    """How many sockets the driver holds open (for tests and stats)."""
    return sum(1 for _ in _transports(driver))


def driver_is_closed(driver: AsyncDriver) -> bool:
    """Whether ``driver.close()`` was called (by anyone): it can open no session now."""
    return bool(getattr(driver, "_closed", False))


def release_orphaned_driver(driver: AsyncDriver) -> int:
    """Close the driver's sockets here and now, silently; return how many.

    Closing our file descriptor sends nothing when another process (a forked
    parent) still holds the same socket, and nothing that would matter to a
    server otherwise: it sees the connection end as if the process had exited.
    """
    released = 0
    for transport in list(_transports(driver)):
        sock = getattr(transport, "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.close()
            # The transport (and its stream writer) would warn when collected.
            with contextlib.suppress(AttributeError):
                transport._sock = None
                transport._closing = True
            released += 1
    pool = getattr(driver, "_pool", None)
    connections = getattr(pool, "connections", None)
    if connections is not None:
        with contextlib.suppress(Exception):
            connections.clear()
    # Nothing can be awaited on this driver again; stop its destructor warning.
    with contextlib.suppress(AttributeError):
        driver._closed = True
    return released


#: Loops a forked child inherited. Kept so their destructors never run: closing
#: a copied selector loop unregisters its file descriptors from the epoll
#: instance the child shares with its parent, which would deafen the parent's loop.
_inherited_loops: list[asyncio.AbstractEventLoop] = []


def retire_inherited_loop(loop: asyncio.AbstractEventLoop) -> None:
    """In a forked child: make sure a parent's loop is never closed from here.

    A loop the child itself is running (``fork`` called inside it) is left to
    the child. Any other is marked closed without closing anything, and kept
    alive; the kernel drops the child's copies of its descriptors at exit.
    """
    if getattr(loop, "_thread_id", None) == threading.get_ident():
        return
    _inherited_loops.append(loop)
    if hasattr(loop, "_closed"):
        loop._closed = True
