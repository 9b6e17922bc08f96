"""TLS termination in the test proxy: the driver speaks real TLS to a plain Bolt server.

The embedded server has no TLS; :class:`~neopool.testing.TlsProxy` terminates it
in front of the server with a certificate of a throwaway CA, so every encrypted
scheme of the driver (``bolt+ssc``, ``neo4j+ssc``, ``bolt`` + ``encrypted`` +
``TrustCustomCAs``) and its refusal of an untrusted certificate (``bolt+s``) are
tested on real sockets, with the proxy's faults still at hand.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time
from typing import Any

import pytest
from neo4j import AsyncDriver, AsyncGraphDatabase
from neo4j.exceptions import ServiceUnavailable, SessionExpired

from exception_chain import caused_by
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionFactory
from neopool.cli import main as cli_main
from neopool.testing import BoltTarget, ProxyProcess, TcpProxy, TlsCertificates, TlsProxy
from polling import eventually_async

pytestmark = pytest.mark.timeout(90)

#: Far beyond every timeout configured below: reaching it means something hung.
HANG = 30.0


# -- helpers ---------------------------------------------------------------------------
def _driver(uri: str, target: BoltTarget, **options: Any) -> AsyncDriver:
    return AsyncGraphDatabase.driver(uri, auth=(target.username, target.password), **options)


def _tls_versions(driver: AsyncDriver) -> list[str | None]:
    """The TLS version of every socket the driver holds (``None`` for a plain one)."""
    versions: list[str | None] = []
    for connections in driver._pool.connections.values():
        for connection in connections:
            ssl_object = connection.socket._writer.transport.get_extra_info("ssl_object")
            versions.append(None if ssl_object is None else ssl_object.version())
    return versions


async def _query_over_tls(uri: str, target: BoltTarget, **options: Any) -> list[str | None]:
    """``RETURN 1`` through ``uri``; the TLS versions of the driver's sockets afterwards."""
    driver = _driver(uri, target, **options)
    try:
        records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
        assert records[0]["one"] == 1
        return _tls_versions(driver)
    finally:
        await driver.close()


def _assert_all_tls(proxy: TcpProxy) -> None:
    stats = proxy.connection_stats()
    assert stats
    assert all(s["tls"] == 1 and s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in stats)
    assert proxy.tls_handshakes == len(stats) == proxy.connections_opened


# -- the certificates ------------------------------------------------------------------
def test_certificates_live_in_a_private_unpredictable_directory_removed_at_the_end() -> None:
    with TlsCertificates() as first, TlsCertificates() as second:
        assert first.directory != second.directory
        for certs in (first, second):
            assert stat.S_IMODE(os.stat(certs.directory).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(certs.key_path).st_mode) == 0o600
            assert {p.name for p in certs.directory.iterdir()} == {"ca.pem", "cert.pem", "key.pem"}
            assert certs.ca_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        directory = first.directory
    assert not directory.exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = first.ca_path


def test_the_proxy_wants_a_server_side_context() -> None:
    with pytest.raises(ValueError, match="server-side"):
        TcpProxy("127.0.0.1", 1, tls=ssl.create_default_context())


# -- the driver's encrypted schemes ----------------------------------------------------
@pytest.mark.parametrize("scheme", ["bolt+ssc", "neo4j+ssc"])
async def test_self_signed_schemes_query_through_the_tls_proxy(
    scheme: str, neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    # A routing driver connects where the server's routing table says, which is the
    # server itself: the resolver keeps it going through the proxy.
    options = {"resolver": neopool_tls_proxy.resolver()} if scheme.startswith("neo4j") else {}
    versions = await _query_over_tls(neopool_tls_proxy.uri(scheme), neopool_bolt, **options)

    assert versions
    assert all(version in ("TLSv1.2", "TLSv1.3") for version in versions)
    _assert_all_tls(neopool_tls_proxy)


async def test_the_default_uri_of_a_tls_proxy_is_bolt_ssc(neopool_tls_proxy: TlsProxy) -> None:
    assert neopool_tls_proxy.uri() == f"bolt+ssc://127.0.0.1:{neopool_tls_proxy.port}"
    assert neopool_tls_proxy.uri("neo4j+ssc").startswith("neo4j+ssc://127.0.0.1:")
    assert "tls" in repr(neopool_tls_proxy)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_bolt_encrypted_trusting_the_custom_ca_verifies_and_queries(
    host: str, neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    options = neopool_tls_proxy.driver_options()
    assert options["encrypted"] is True
    assert options["trusted_certificates"].certs == (str(neopool_tls_proxy.ca_path),)
    uri = f"bolt://{host}:{neopool_tls_proxy.port}"

    versions = await _query_over_tls(uri, neopool_bolt, **options)

    assert versions
    assert all(version is not None for version in versions)
    _assert_all_tls(neopool_tls_proxy)


async def test_bolt_s_trusting_only_system_cas_refuses_the_throwaway_certificate(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    with pytest.raises(ServiceUnavailable) as refused:
        await asyncio.wait_for(
            _query_over_tls(
                neopool_tls_proxy.uri("bolt+s"), neopool_bolt, max_transaction_retry_time=0.0
            ),
            HANG,
        )
    assert caused_by(refused.value, ssl.SSLCertVerificationError)
    assert "SSLCertVerificationError" in str(refused.value)
    assert neopool_tls_proxy.connections_opened >= 1  # it got as far as the proxy
    assert neopool_tls_proxy.tls_handshakes == 0


async def test_the_custom_ca_checks_the_host_name(neopool_bolt: BoltTarget) -> None:
    """A certificate of the trusted CA but for another host is refused: it is no TrustAll."""
    host, port = neopool_bolt.server_address
    with (
        TlsCertificates(hosts=["db.invalid"]) as other_host,
        TlsProxy(host, port, other_host) as proxy,
    ):
        with pytest.raises(ServiceUnavailable) as refused:
            await asyncio.wait_for(
                _query_over_tls(
                    proxy.uri("bolt"),
                    neopool_bolt,
                    max_transaction_retry_time=0.0,
                    **proxy.driver_options(),
                ),
                HANG,
            )
        assert caused_by(refused.value, ssl.SSLCertVerificationError)
        assert proxy.tls_handshakes == 0


async def test_a_plaintext_driver_is_turned_away_by_the_tls_proxy(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(
            _query_over_tls(
                neopool_tls_proxy.uri("bolt"), neopool_bolt, max_transaction_retry_time=0.0
            ),
            HANG,
        )
    assert neopool_tls_proxy.tls_handshakes == 0
    assert await eventually_async(lambda: neopool_tls_proxy.active_connections == 0, HANG)


# -- the proxy's faults, over TLS ------------------------------------------------------
async def test_cut_all_mid_query_over_tls_gives_the_driver_a_connectivity_error(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    driver = _driver(neopool_tls_proxy.uri(), neopool_bolt)
    try:
        async with driver.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            versions = _tls_versions(driver)
            assert versions
            assert all(versions)
            neopool_tls_proxy.set_latency(400)  # the next query is in flight when the cut lands
            sent = neopool_tls_proxy.bytes_up
            query = asyncio.ensure_future(session.run("RETURN 2"))
            # The query reached the server; its answer is 200 ms from the driver.
            assert await eventually_async(lambda: neopool_tls_proxy.bytes_up > sent, HANG)
            assert neopool_tls_proxy.cut_all() >= 1
            with pytest.raises((ServiceUnavailable, SessionExpired)):
                await asyncio.wait_for(query, HANG)
        assert neopool_tls_proxy.active_connections == 0
        neopool_tls_proxy.set_latency(0)
        records, _, _ = await driver.execute_query("RETURN 3 AS three", database_="neo4j")
        assert records[0]["three"] == 3  # a new TLS connection, after the cut
    finally:
        await driver.close()
    assert neopool_tls_proxy.tls_handshakes >= 2


@pytest.mark.timing
async def test_latency_over_tls_charges_the_handshake_and_keeps_byte_order(
    echo_port: int, neopool_tls_certificates: TlsCertificates
) -> None:
    with TlsProxy("127.0.0.1", echo_port, neopool_tls_certificates, rtt_ms=200) as proxy:
        client = neopool_tls_certificates.client_context()
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=client)
        connected = time.perf_counter() - started
        assert writer.get_extra_info("ssl_object") is not None
        try:
            payload = bytes(range(256)) * 4096  # 1 MiB, many TLS records
            started = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(len(payload)) == payload
            echoed = time.perf_counter() - started

            proxy.set_latency(0)
            started = time.perf_counter()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            fast = time.perf_counter() - started
        finally:
            writer.close()
    # TCP's set-up, then TLS's round trip: the handshake crosses the delay line too.
    assert connected >= 0.39
    assert echoed >= 0.19
    assert fast < 0.19
    assert proxy.tls_handshakes == 1
    stats = proxy.connection_stats()
    assert stats[0]["bytes_up"] > len(payload)  # ciphertext: records cost a little more


async def test_blackhole_stalls_the_tls_handshake_until_lifted(
    echo_port: int, neopool_tls_certificates: TlsCertificates
) -> None:
    with TlsProxy("127.0.0.1", echo_port, neopool_tls_certificates) as proxy:
        proxy.set_blackhole(True)
        connecting = asyncio.ensure_future(
            asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=neopool_tls_certificates.client_context()
            )
        )
        done, _ = await asyncio.wait({connecting}, timeout=0.5)
        assert not done  # accepted, but the server's hello never comes
        assert proxy.connections_opened == 1
        assert proxy.tls_handshakes == 0

        proxy.set_blackhole(False)
        reader, writer = await asyncio.wait_for(connecting, HANG)
        writer.write(b"through")
        assert await asyncio.wait_for(reader.readexactly(7), HANG) == b"through"
        writer.close()
        assert proxy.tls_handshakes == 1


async def test_a_blackholed_tls_proxy_fails_the_driver_within_its_connection_timeout(
    neopool_bolt: BoltTarget, neopool_tls_proxy: TlsProxy
) -> None:
    neopool_tls_proxy.set_blackhole(True)
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(
            _query_over_tls(
                neopool_tls_proxy.uri(),
                neopool_bolt,
                connection_timeout=1.0,
                connection_acquisition_timeout=1.0,
                max_transaction_retry_time=0.0,
            ),
            HANG,
        )
    assert neopool_tls_proxy.connections_opened >= 1
    assert neopool_tls_proxy.tls_handshakes == 0
    neopool_tls_proxy.set_blackhole(False)
    assert await _query_over_tls(neopool_tls_proxy.uri(), neopool_bolt)


# -- through the pool ------------------------------------------------------------------
async def test_the_pool_borrows_and_queries_over_tls(
    neopool_bolt: BoltTarget,
    neopool_registry: GlobalNeo4jConnectionPool,
    neopool_tls_proxy: TlsProxy,
) -> None:
    GlobalNeo4jConnectionPool.set_config(neopool_bolt.config(uri=neopool_tls_proxy.uri()))
    try:
        for _ in range(3):
            async with Neo4jConnectionFactory.borrow_connection() as borrowed:
                driver = await borrowed.get_driver()
                records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
                assert records[0]["one"] == 1
                versions = _tls_versions(driver)
                assert versions
                assert all(version is not None for version in versions)
    finally:
        await neopool_registry.close_all_pools()
    _assert_all_tls(neopool_tls_proxy)


# -- in a process of its own -----------------------------------------------------------
async def test_a_proxy_process_terminates_tls_with_latency(
    neopool_bolt: BoltTarget, neopool_tls_certificates: TlsCertificates
) -> None:
    host, port = neopool_bolt.server_address  # the server itself, also in a TLS run
    with ProxyProcess(
        host,
        port,
        rtt_ms=200,
        tls_cert=neopool_tls_certificates.cert_path,
        tls_key=neopool_tls_certificates.key_path,
    ) as proxy:
        assert proxy.uri() == f"bolt+ssc://127.0.0.1:{proxy.port}"
        started = time.perf_counter()
        versions = await _query_over_tls(proxy.uri(), neopool_bolt)
        # set-up, TLS, Bolt handshake, HELLO/LOGON, the query: at least five round trips
        assert time.perf_counter() - started >= 0.99
        assert versions
        assert all(version is not None for version in versions)
        verified = await _query_over_tls(
            proxy.uri("bolt"), neopool_bolt, **neopool_tls_certificates.driver_options()
        )
        assert verified
        assert all(version is not None for version in verified)


def test_a_tls_key_without_a_certificate_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="tls_key needs tls_cert"):
        ProxyProcess("127.0.0.1", 1, tls_key=tmp_path / "key.pem")
    with pytest.raises(SystemExit) as exited:
        cli_main(["proxy", "127.0.0.1:1", "--tls-key", str(tmp_path / "key.pem")])
    assert exited.value.code == 2
