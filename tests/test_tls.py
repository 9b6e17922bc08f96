"""The pool over TLS as configured: custom CAs, mutual TLS, user agent and notifications.

The Bolt server is real (embedded ArcadeDB, or Neo4j from the environment);
TLS is terminated in front of it by :class:`neopool.testing.TlsProxy` with a
throwaway CA's certificate. Nothing is mocked: the driver verifies real
certificates on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator

import pytest
from neo4j.exceptions import ServiceUnavailable

from exception_chain import caused_by
from neopool import EventLoopConnectionPool, Neo4jConnectionConfig
from neopool.testing import BoltTarget, TlsCertificates, TlsProxy, tls_requested, tls_target

pytestmark = pytest.mark.timeout(90)

KEY_PASSWORD = "key-pass-very-secret"


async def _query_through_pool(config: Neo4jConnectionConfig, value: int = 1) -> int:
    pool = EventLoopConnectionPool(config, "tls")
    try:
        lease = await pool.borrow()
        try:
            driver = await lease.get_driver()
            records, _, _ = await driver.execute_query(
                "RETURN $value AS value", value=value, database_="neo4j"
            )
            return int(records[0]["value"])
        finally:
            await pool.return_connection(lease)
    finally:
        await pool.close()


def _all_tls(proxy: TlsProxy) -> bool:
    stats = proxy.connection_stats()
    return bool(stats) and all(s["tls"] == 1 and s["bytes_down"] > 0 for s in stats)


# -- trusted_certificates --------------------------------------------------------------------
async def test_the_pool_verifies_the_server_against_trusted_certificates(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    config = neopool_bolt.config(
        uri=f"bolt://127.0.0.1:{neopool_tls_proxy.port}",
        trusted_certificates=[neopool_tls_proxy.ca_path],
        pool_min_size=2,
    )
    assert await _query_through_pool(config, 7) == 7
    assert neopool_tls_proxy.tls_handshakes >= 2  # pool_min_size sockets, all TLS
    assert _all_tls(neopool_tls_proxy)


async def test_a_server_certificate_of_another_ca_is_refused(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    with TlsCertificates() as stranger:
        config = neopool_bolt.config(
            uri=f"bolt://127.0.0.1:{neopool_tls_proxy.port}",
            trusted_certificates=[stranger.ca_path],
            connection_timeout=5.0,
        )
        with pytest.raises(ServiceUnavailable) as refused:
            await _query_through_pool(config)
    assert caused_by(refused.value, ssl.SSLCertVerificationError)
    assert neopool_tls_proxy.tls_handshakes == 0


# -- mutual TLS ------------------------------------------------------------------------------
@pytest.fixture
def mtls_proxy(
    neopool_bolt: BoltTarget, neopool_tls_certificates: TlsCertificates
) -> Iterator[TlsProxy]:
    """A TLS proxy that wants a client certificate of the throwaway CA."""
    host, port = neopool_bolt.server_address
    with TlsProxy(host, port, neopool_tls_certificates, client_certificates=True) as proxy:
        yield proxy


async def test_mutual_tls_with_an_encrypted_client_key(
    neopool_bolt: BoltTarget, mtls_proxy: TlsProxy, neopool_tls_certificates: TlsCertificates
) -> None:
    cert, key = neopool_tls_certificates.client_certificate(key_password=KEY_PASSWORD)
    uri = f"bolt://127.0.0.1:{mtls_proxy.port}"
    trusted = [neopool_tls_certificates.ca_path]

    without = neopool_bolt.config(uri=uri, trusted_certificates=trusted, connection_timeout=5.0)
    with pytest.raises(ServiceUnavailable):
        await _query_through_pool(without)
    assert mtls_proxy.tls_handshakes == 0  # turned away: no client certificate

    config = neopool_bolt.config(
        uri=uri,
        trusted_certificates=trusted,
        client_certificate=cert,
        client_key=key,
        client_key_password=KEY_PASSWORD,
    )
    assert await _query_through_pool(config, 3) == 3
    assert mtls_proxy.tls_handshakes >= 1
    assert KEY_PASSWORD not in repr(config)


async def test_mutual_tls_with_the_bolt_ssc_scheme(
    neopool_bolt: BoltTarget, mtls_proxy: TlsProxy, neopool_tls_certificates: TlsCertificates
) -> None:
    cert, key = neopool_tls_certificates.client_certificate()
    config = neopool_bolt.config(
        uri=mtls_proxy.uri("bolt+ssc"), client_certificate=cert, client_key=key
    )
    assert await _query_through_pool(config, 4) == 4
    assert mtls_proxy.tls_handshakes >= 1


# -- what the server is told -----------------------------------------------------------------
async def test_the_user_agent_and_notification_filters_reach_the_server(
    neopool_bolt: BoltTarget, caplog: pytest.LogCaptureFixture
) -> None:
    config = neopool_bolt.config(
        user_agent="billing-worker/2.1",
        notifications_min_severity="warning",
        notifications_disabled_classifications=["hint", "deprecation"],
    )
    with caplog.at_level(logging.DEBUG, logger="neo4j"):
        assert await _query_through_pool(config, 5) == 5  # the server took the HELLO
    hellos = [r.getMessage() for r in caplog.records if "C: HELLO" in r.getMessage()]
    assert hellos
    for hello in hellos:
        assert "'user_agent': 'billing-worker/2.1'" in hello
        assert "'notifications_minimum_severity': 'WARNING'" in hello
        assert "'HINT'" in hello
        assert "'DEPRECATION'" in hello


async def test_the_default_user_agent_names_neopool(
    neopool_bolt: BoltTarget, caplog: pytest.LogCaptureFixture
) -> None:
    import neopool

    with caplog.at_level(logging.DEBUG, logger="neo4j"):
        assert await _query_through_pool(neopool_bolt.config(), 6) == 6
    hellos = [r.getMessage() for r in caplog.records if "C: HELLO" in r.getMessage()]
    assert hellos
    assert all(f"'user_agent': 'neopool/{neopool.__version__}'" in h for h in hellos)


# -- the suite over TLS ----------------------------------------------------------------------
async def test_tls_target_puts_a_verified_tls_proxy_in_front_of_a_target(
    neopool_bolt: BoltTarget, neopool_tls_certificates: TlsCertificates
) -> None:
    with tls_target(neopool_bolt, neopool_tls_certificates) as target:
        assert target.tls
        assert target.uri.startswith("bolt://127.0.0.1:")
        assert target.server_address == neopool_bolt.server_address
        config = target.config()
        assert config.trusted_certificates == (str(neopool_tls_certificates.ca_path),)
        assert target.config(uri="bolt+ssc://127.0.0.1:1").trusted_certificates is None
        assert await _query_through_pool(config, 8) == 8
        assert target.tls_proxy is not None
        assert _all_tls(target.tls_proxy)


async def test_a_tls_run_reaches_the_server_over_tls_only(neopool_bolt: BoltTarget) -> None:
    """With NEOPOOL_TEST_TLS=1 (``make test`` does one such run), every test is over TLS."""
    if not tls_requested():
        assert not neopool_bolt.tls
        pytest.skip("a plain run: NEOPOOL_TEST_TLS=1 runs the suite's Bolt traffic over TLS")
    proxy = neopool_bolt.tls_proxy
    assert proxy is not None
    assert neopool_bolt.config().trusted_certificates
    before = proxy.tls_handshakes
    assert await asyncio.wait_for(_query_through_pool(neopool_bolt.config(), 9), 60) == 9
    assert proxy.tls_handshakes > before
    assert _all_tls(proxy)
