"""Counting what each worker process opens: drivers, and TCP connections to Bolt.

The demo must show that connections stop growing with the number of tasks
under neopool's persistent runner. Drivers are counted by the factory that
builds them; connections by wrapping the event loop's ``sock_connect``, which
is how the asyncio Neo4j driver opens its sockets (Celery's broker client uses
blocking sockets, so it is not counted). Installed only in the demo's workers.
"""

from __future__ import annotations

import asyncio.selector_events
import threading
from typing import Any

from neo4j import AsyncDriver

from neopool.config import Neo4jConnectionConfig
from neopool.loop_pool import create_driver
from neopool.registry import GlobalNeo4jConnectionPool

_lock = threading.Lock()
_counts = {"connections_opened": 0, "drivers_created": 0}
_installed = False


def _bump(name: str) -> None:
    with _lock:
        _counts[name] += 1


def counts() -> dict[str, int]:
    """This process's totals so far."""
    with _lock:
        return dict(_counts)


def new_driver(config: Neo4jConnectionConfig) -> AsyncDriver:
    """``create_driver`` that is counted: every driver the demo opens goes through here."""
    _bump("drivers_created")
    return create_driver(config)


def install() -> None:
    """Count socket connects of asyncio loops and drivers made by neopool's pools."""
    global _installed
    if _installed:
        return
    _installed = True
    loop_class: Any = asyncio.selector_events.BaseSelectorEventLoop
    original = loop_class.sock_connect

    async def sock_connect(self: Any, sock: Any, address: Any) -> None:
        _bump("connections_opened")
        await original(self, sock, address)

    loop_class.sock_connect = sock_connect
    GlobalNeo4jConnectionPool.set_driver_factory(new_driver)
