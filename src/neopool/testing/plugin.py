"""pytest fixtures with real servers: ``pytest_plugins = ["neopool.testing.plugin"]``.

==============================  =======  ===================================================
fixture                         scope    what it gives
==============================  =======  ===================================================
``neopool_bolt``                session  a :class:`BoltTarget` (embedded ArcadeDB, or Neo4j
                                         from ``NEOPOOL_TEST_NEO4J_URI``/``_USER``/``_PASSWORD``)
``neopool_broker_url``          session  a Celery broker URL (embedded Valkey, or
                                         ``NEOPOOL_TEST_BROKER_URL``)
``neopool_config``              test     a config for ``neopool_bolt`` with default settings
``neopool_registry``            test     the global registry, configured for ``neopool_bolt``
                                         and emptied again after the test
``neopool_proxy``               test     a :class:`TcpProxy` in front of ``neopool_bolt``
                                         (``proxy.uri()`` is where the driver connects)
``neopool_tls_certificates``    session  a :class:`TlsCertificates`: a throwaway CA and a
                                         certificate for 127.0.0.1/localhost, PEM files in a
                                         private temp dir (``.ca_path``, ``.cert_path``,
                                         ``.key_path``), removed after the session
``neopool_tls_proxy``           test     a :class:`TlsProxy` in front of ``neopool_bolt``: it
                                         terminates TLS and forwards plaintext, with every
                                         fault of :class:`TcpProxy`. ``proxy.uri()`` is
                                         ``bolt+ssc://`` (``proxy.uri("neo4j+ssc")`` too);
                                         ``proxy.uri("bolt")`` with ``**proxy.driver_options()``
                                         verifies against ``proxy.ca_path``
==============================  =======  ===================================================
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from neopool.config import Neo4jConnectionConfig
from neopool.embedded.arcadedb import BoltServer
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.testing.proxy import TcpProxy, TlsProxy
from neopool.testing.targets import BoltTarget, bolt_target_from_env, reset_registry
from neopool.testing.tls import TlsCertificates


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


@pytest.fixture(scope="session")
def neopool_tls_certificates() -> Iterator[TlsCertificates]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (needs trustme)."""
    pytest.importorskip("trustme", reason="TLS fixtures need trustme (the dev extra)")
    with TlsCertificates() as certificates:
        yield certificates


@pytest.fixture
def neopool_tls_proxy(
    neopool_bolt: BoltTarget, neopool_tls_certificates: TlsCertificates
) -> Iterator[TlsProxy]:
    """A TLS-terminating proxy in front of the session's Bolt server.

    Connect with ``neopool_bolt.config(uri=neopool_tls_proxy.uri())`` (``bolt+ssc://``,
    any certificate accepted), or verify: ``AsyncGraphDatabase.driver(proxy.uri("bolt"),
    auth=..., **proxy.driver_options())`` trusts only the CA at ``proxy.ca_path``.
    """
    address = urlsplit(neopool_bolt.uri)
    with TlsProxy(
        address.hostname or "127.0.0.1", address.port or 7687, neopool_tls_certificates
    ) as proxy:
        yield proxy
