"""The suite runs on real servers: see neopool.testing.plugin for the fixtures.

Shared here: ``configure`` (the registry set up for one test, reset after it),
``unraisable`` (no exception may escape a finalizer), and ``bolt_proxy`` with
``worker_config`` (what worker subprocesses connect with, counted; the Celery and
LightRAG tests). Helpers every package imports are plain modules on the test
path: ``polling``, ``user_code`` and ``exception_chain``.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig
from neopool.testing import BoltTarget, TcpProxy

pytest_plugins = ["neopool.testing.plugin"]


@pytest.fixture
def configure(
    neopool_registry: GlobalNeo4jConnectionPool, neopool_bolt: BoltTarget
) -> Callable[..., Neo4jConnectionConfig]:
    """Configure the registry with ``neopool_bolt.config(**settings)`` for this test only.

    ``neopool_registry`` empties the registry and forgets the configuration and
    the driver factory after the test, whatever it set.
    """

    def configure(**settings: Any) -> Neo4jConnectionConfig:
        config = neopool_bolt.config(**settings)
        GlobalNeo4jConnectionPool.set_config(config)
        return config

    return configure


@pytest.fixture
def bolt_proxy(neopool_bolt: BoltTarget) -> Iterator[TcpProxy]:
    """A counting TCP proxy in front of ``neopool_bolt.uri``: how many connections workers open.

    Unlike ``neopool_proxy`` it never terminates TLS: it passes the bytes on to
    ``neopool_bolt.uri`` as they are.
    """
    host, port = neopool_bolt.uri.split("://", 1)[1].rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        yield proxy


@pytest.fixture
def worker_config(neopool_bolt: BoltTarget, bolt_proxy: TcpProxy) -> Neo4jConnectionConfig:
    """What worker subprocesses connect with: the Bolt server, through ``bolt_proxy``."""
    scheme = neopool_bolt.uri.split("://", 1)[0]
    return neopool_bolt.config(uri=bolt_proxy.uri(scheme))


@pytest.fixture
def unraisable() -> Iterator[list[Any]]:
    """Every exception that escapes a finalizer during the test (there must be none)."""
    seen: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append((info.exc_type, info.exc_value, info.object))
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert not seen, f"exceptions escaped finalizers: {seen}"
