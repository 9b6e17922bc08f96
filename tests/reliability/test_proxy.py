"""The fault-injecting TCP proxy of neopool.testing does what it says, on real sockets."""

from __future__ import annotations

import asyncio
import socketserver
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from neo4j import AsyncGraphDatabase
from neo4j.exceptions import ServiceUnavailable, SessionExpired

from neopool.testing import BoltTarget, ProxyProcess, TcpProxy
from polling import eventually_async

pytestmark = pytest.mark.timeout(60)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port_sync() -> Iterator[int]:
    """A real TCP echo server in a thread, for tests without a loop."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield int(server.server_address[1])
        server.shutdown()


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def _query(uri: str, target: BoltTarget, **options: float) -> int:
    driver = AsyncGraphDatabase.driver(uri, auth=(target.username, target.password), **options)
    try:
        records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
        return int(records[0]["one"])
    finally:
        await driver.close()


async def test_bolt_traffic_goes_through_the_proxy_and_is_counted(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy
) -> None:
    assert neopool_proxy.uri() == f"bolt://127.0.0.1:{neopool_proxy.port}"
    assert await _query(neopool_proxy.uri(), neopool_bolt) == 1

    stats = neopool_proxy.connection_stats()
    assert neopool_proxy.connections_opened == len(stats) >= 1
    assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in stats)
    assert neopool_proxy.bytes_up == sum(s["bytes_up"] for s in stats)
    assert neopool_proxy.bytes_down == sum(s["bytes_down"] for s in stats)
    assert {"id", "bytes_up", "bytes_down", "open", "opened_at"} <= set(stats[0])


async def test_the_proxy_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy("127.0.0.1", 1, listen_host="0.0.0.0")
    with TcpProxy("127.0.0.1", 1) as proxy:
        assert proxy.host == "127.0.0.1"
        assert proxy._server is not None
        assert all(s.getsockname()[0] == "127.0.0.1" for s in proxy._server.sockets)


async def test_an_unreachable_upstream_ends_the_client_connection(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", 1) as proxy:  # nothing listens on port 1
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(1), 10) == b""
        writer.close()


async def test_cut_all_closes_every_open_connection_on_both_sides(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        clients = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
        for reader, writer in clients:  # every connection is through to the upstream
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert proxy.active_connections == 3

        assert proxy.cut_all() == 3

        for reader, writer in clients:
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)
            writer.close()
        assert proxy.active_connections == 0
        assert proxy.cut_all() == 0
        assert await _round_trip(proxy.port, b"again") == b"again"  # new ones still work


async def test_cut_all_mid_query_gives_the_driver_a_connectivity_error(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy
) -> None:
    driver = AsyncGraphDatabase.driver(
        neopool_proxy.uri(), auth=(neopool_bolt.username, neopool_bolt.password)
    )
    try:
        async with driver.session(database="neo4j") as session:
            await (await session.run("RETURN 1")).consume()
            neopool_proxy.set_latency(400)  # the next query is in flight when the cut lands
            sent = neopool_proxy.bytes_up
            query = asyncio.ensure_future(session.run("RETURN 2"))
            # The query reached the server; its answer is 200 ms from the driver.
            assert await eventually_async(lambda: neopool_proxy.bytes_up > sent)
            assert neopool_proxy.cut_all() >= 1
            with pytest.raises((ServiceUnavailable, SessionExpired)):
                await asyncio.wait_for(query, 30)
    finally:
        await driver.close()


@pytest.mark.timing
async def test_latency_delays_each_direction_and_keeps_byte_order(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port, rtt_ms=200) as proxy:
        payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
        started = time.perf_counter()
        assert await _round_trip(proxy.port, payload) == payload
        assert time.perf_counter() - started >= 0.19

        proxy.set_latency(0)
        started = time.perf_counter()
        assert await _round_trip(proxy.port, b"x") == b"x"
        assert time.perf_counter() - started < 0.19
        with pytest.raises(ValueError, match="rtt_ms"):
            proxy.set_latency(-1)


@pytest.mark.timing
async def test_latency_charges_one_round_trip_to_set_up_a_connection(echo_port: int) -> None:
    """As TCP's handshake does on a real network: the first exchange takes two round trips."""
    with TcpProxy("127.0.0.1", echo_port, rtt_ms=200) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        exchanges = []
        for payload in (b"a", b"b"):
            started = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(1) == payload
            exchanges.append(time.perf_counter() - started)
        writer.close()
    first, second = exchanges
    assert first >= 0.39  # set-up, then the round trip
    assert 0.19 <= second < 0.39  # an open connection pays the round trip only


@pytest.mark.timing
async def test_latency_is_a_delay_line_not_a_sleep_per_chunk(echo_port: int) -> None:
    """Fifty small messages in flight at once all arrive about one round trip later."""
    with TcpProxy("127.0.0.1", echo_port, rtt_ms=200) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.perf_counter()
        for i in range(50):
            writer.write(b"%03d" % i)
            await writer.drain()
            await asyncio.sleep(0.002)  # separate chunks, not one coalesced write
        echoed = await reader.readexactly(150)
        elapsed = time.perf_counter() - started
        writer.close()
    assert echoed == b"".join(b"%03d" % i for i in range(50))
    # A per-chunk sleep would take >= 50 x 0.1 s; a delay line takes about one rtt.
    assert elapsed < 2.5


async def test_blackhole_accepts_but_never_answers_then_recovers(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        old_reader, old_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        old_writer.write(b"a")
        assert await old_reader.readexactly(1) == b"a"

        proxy.set_blackhole(True)
        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        new_writer.write(b"b")
        old_writer.write(b"c")
        for reader in (new_reader, old_reader):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.5)
        assert proxy.connections_opened == 2  # it did accept

        proxy.set_blackhole(False)
        assert await asyncio.wait_for(new_reader.readexactly(1), 10) == b"b"
        assert await asyncio.wait_for(old_reader.readexactly(1), 10) == b"c"
        new_writer.close()
        old_writer.close()


async def test_a_blackholed_bolt_server_fails_the_driver_within_its_connection_timeout(
    neopool_bolt: BoltTarget, neopool_proxy: TcpProxy
) -> None:
    neopool_proxy.set_blackhole(True)
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(
            _query(
                neopool_proxy.uri(),
                neopool_bolt,
                connection_timeout=1.0,
                connection_acquisition_timeout=1.0,
                max_transaction_retry_time=0.0,
            ),
            30,
        )
    assert neopool_proxy.connections_opened >= 1
    neopool_proxy.set_blackhole(False)
    assert await _query(neopool_proxy.uri(), neopool_bolt) == 1


def test_the_proxy_works_from_sync_code_and_stops_cleanly(echo_port_sync: int) -> None:
    proxy = TcpProxy("127.0.0.1", echo_port_sync).start()
    assert asyncio.run(_round_trip(proxy.port, b"sync")) == b"sync"
    proxy.stop()
    proxy.stop()  # twice is harmless
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(_round_trip(proxy.port, b"gone"))


async def test_a_proxy_process_carries_bolt_with_latency_and_ends_with_its_block(
    neopool_bolt: BoltTarget,
) -> None:
    address = urlsplit(neopool_bolt.uri)
    with ProxyProcess(address.hostname or "127.0.0.1", address.port or 7687, rtt_ms=200) as proxy:
        assert proxy.uri() == f"bolt://127.0.0.1:{proxy.port}"
        started = time.perf_counter()
        assert await _query(proxy.uri(), neopool_bolt) == 1
        # set-up, Bolt handshake, HELLO/LOGON, the query: at least four round trips
        assert time.perf_counter() - started >= 0.79
        process = proxy._process
        assert process is not None
    assert process.poll() is not None  # the child is gone
    with pytest.raises(ConnectionRefusedError):
        await _round_trip(proxy.port, b"x")


@pytest.mark.subprocess
def test_a_proxy_process_that_cannot_listen_says_so(echo_port_sync: int) -> None:
    taken = ProxyProcess("127.0.0.1", echo_port_sync, listen_port=echo_port_sync)
    with pytest.raises(RuntimeError, match="did not start"):
        taken.start()
