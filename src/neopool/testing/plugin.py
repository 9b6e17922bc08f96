"""pytest fixtures with real servers, for your own tests too.

``pip install 'neopool[testing]'`` and they are there: pytest loads this plugin
through neopool's ``pytest11`` entry point (named ``neopool``; ``-p no:neopool``
turns it off).

==============================  =======  ===================================================
fixture                         scope    what it gives
==============================  =======  ===================================================
``neopool_bolt``                session  a :class:`BoltTarget` (embedded ArcadeDB, or Neo4j
                                         from ``NEOPOOL_TEST_NEO4J_URI``/``_USER``/``_PASSWORD``);
                                         with ``NEOPOOL_TEST_TLS=1``, reached over TLS through
                                         a TLS-terminating proxy (see below)
``neopool_broker_url``          session  a Celery broker URL (embedded Valkey, or
                                         ``NEOPOOL_TEST_BROKER_URL``)
``neopool_config``              test     a config for ``neopool_bolt`` with default settings
``neopool_registry``            test     the global registry, configured for ``neopool_bolt``
                                         and emptied again after the test
``neopool_proxy``               test     a :class:`TcpProxy` in front of ``neopool_bolt``
                                         (``proxy.uri()`` is where the driver connects); a
                                         :class:`TlsProxy` with ``NEOPOOL_TEST_TLS=1``
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

A TLS run (``NEOPOOL_TEST_TLS=1``): every test that reaches the server through
these fixtures speaks TLS. ``neopool_bolt.uri`` is then
``bolt://127.0.0.1:<port>`` of a session-long :class:`TlsProxy` whose
certificate a throwaway CA signed, and ``neopool_bolt.config()`` trusts that CA
(``trusted_certificates``), so the driver verifies the certificate and the host
name as it would in production; ``neopool_proxy`` terminates TLS too
(``proxy.uri()`` is ``bolt+ssc://``). ``make test`` runs the core, churn, fork,
restart, TLS and credential-rotation tests this way once more (``make unit-tls``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from neopool.config import Neo4jConnectionConfig
from neopool.embedded.arcadedb import BoltServer
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.testing.proxy import TcpProxy, TlsProxy
from neopool.testing.targets import (
    TLS_ENV,
    BoltTarget,
    bolt_target_from_env,
    reset_registry,
    tls_requested,
    tls_target,
)
from neopool.testing.tls import TlsCertificates


def pytest_report_header() -> str | None:
    """Say so at the top of the run when Bolt goes over TLS."""
    if tls_requested():
        return f"neopool: {TLS_ENV}=1: Bolt over TLS, through a TLS-terminating proxy"
    return None


@pytest.fixture(scope="session")
def neopool_bolt(request: pytest.FixtureRequest) -> Iterator[BoltTarget]:
    """A real Bolt server for the whole session (over TLS when ``NEOPOOL_TEST_TLS=1``)."""
    with contextlib.ExitStack() as stack:
        target = bolt_target_from_env()
        if target is None:
            server = stack.enter_context(BoltServer())
            target = BoltTarget(server.uri, server.username, server.password, embedded=server)
        if tls_requested():
            certificates = request.getfixturevalue("neopool_tls_certificates")
            target = stack.enter_context(tls_target(target, certificates))
        yield target


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
def neopool_proxy(neopool_bolt: BoltTarget, request: pytest.FixtureRequest) -> Iterator[TcpProxy]:
    """A real TCP proxy in front of the session's Bolt server, for network faults.

    Connect with ``neopool_bolt.config(uri=neopool_proxy.uri())``: a direct
    ``bolt://`` URI, so a routing table cannot lead the driver around the proxy.
    In a TLS run it is a :class:`TlsProxy` and ``uri()`` is ``bolt+ssc://``.
    """
    host, port = neopool_bolt.server_address
    if tls_requested():
        certificates = request.getfixturevalue("neopool_tls_certificates")
        with TlsProxy(host, port, certificates) as tls_proxy:
            yield tls_proxy
        return
    with TcpProxy(host, port) as proxy:
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
    host, port = neopool_bolt.server_address
    with TlsProxy(host, port, neopool_tls_certificates) as proxy:
        yield proxy
