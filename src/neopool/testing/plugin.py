"""pytest fixtures with real servers: ``pytest_plugins = ["neopool.testing.plugin"]``.

=========================  =======  ===================================================
fixture                    scope    what it gives
=========================  =======  ===================================================
``neopool_bolt``           session  a :class:`BoltTarget` (embedded ArcadeDB, or Neo4j
                                    from ``NEOPOOL_TEST_NEO4J_URI``/``_USER``/``_PASSWORD``)
``neopool_broker_url``     session  a Celery broker URL (embedded Valkey, or
                                    ``NEOPOOL_TEST_BROKER_URL``)
``neopool_config``         test     a config for ``neopool_bolt`` with default settings
``neopool_registry``       test     the global registry, configured for ``neopool_bolt``
                                    and emptied again after the test
``neopool_proxy``          test     a :class:`TcpProxy` in front of ``neopool_bolt``
                                    (``proxy.uri()`` is where the driver connects)
=========================  =======  ===================================================
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from neopool.config import Neo4jConnectionConfig
from neopool.embedded.arcadedb import BoltServer
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.testing.proxy import TcpProxy
from neopool.testing.targets import BoltTarget, bolt_target_from_env, reset_registry


@pytest.fixture(scope="session")
def neopool_bolt() -> Iterator[BoltTarget]:
    """A real Bolt server for the whole session."""
    target = bolt_target_from_env()
    if target is not None:
        yield target
        return
    with BoltServer() as server:
        yield BoltTarget(server.uri, server.username, server.password, embedded=server)


@pytest.fixture(scope="session")
def neopool_broker_url() -> Iterator[str]:
    """A real Celery broker (Valkey) for the whole session."""
    url = os.environ.get("NEOPOOL_TEST_BROKER_URL")
    if url:
        yield url
        return
    from neopool.embedded.valkey import BrokerServer

    with BrokerServer() as broker:
        yield broker.url


@pytest.fixture
def neopool_config(neopool_bolt: BoltTarget) -> Neo4jConnectionConfig:
    """Default settings for the session's Bolt server."""
    return neopool_bolt.config()


@pytest.fixture
def neopool_registry(
    neopool_config: Neo4jConnectionConfig,
) -> Iterator[GlobalNeo4jConnectionPool]:
    """The global registry, configured for the test server, empty before and after."""
    reset_registry()
    GlobalNeo4jConnectionPool.set_config(neopool_config)
    yield GlobalNeo4jConnectionPool()
    reset_registry()


@pytest.fixture
def neopool_proxy(neopool_bolt: BoltTarget) -> Iterator[TcpProxy]:
    """A real TCP proxy in front of the session's Bolt server, for network faults.

    Connect with ``neopool_bolt.config(uri=neopool_proxy.uri())``: a direct
    ``bolt://`` URI, so a routing table cannot lead the driver around the proxy.
    """
    address = urlsplit(neopool_bolt.uri)
    with TcpProxy(address.hostname or "127.0.0.1", address.port or 7687) as proxy:
        yield proxy
