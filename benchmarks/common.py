"""What every benchmark shares: the server, the proxy, options, tables and JSON.

Run the benchmarks as scripts (``python benchmarks/micro.py``); each prints a
table and writes ``results/<name>.json`` with the machine described.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neopool import Neo4jConnectionConfig
from neopool.demo.report import RESULTS_DIR, machine_info, print_table, write_json

__all__ = [
    "RESULTS_DIR",
    "Target",
    "bolt_target",
    "network",
    "network_label",
    "networks",
    "parser",
    "print_table",
    "save",
]


@dataclass(frozen=True)
class Target:
    """A Bolt server: ``uri`` may point at the proxy in front of it."""

    uri: str
    username: str
    password: str = field(repr=False)
    database: str = "neo4j"

    def config(self, **settings: Any) -> Neo4jConnectionConfig:
        """Pool settings for this server."""
        return Neo4jConnectionConfig(
            uri=self.uri, username=self.username, password=self.password, **settings
        )

    def auth(self) -> tuple[str, str]:
        """The driver's auth pair."""
        return (self.username, self.password)


@contextlib.contextmanager
def bolt_target(java_options: tuple[str, ...] = ()) -> Iterator[Target]:
    """``NEO4J_URI`` (and friends) if set, else an embedded ArcadeDB for the run.

    ``java_options`` are added to the embedded server's JVM options.
    """
    uri = os.environ.get("NEO4J_URI")
    if uri:
        yield Target(
            uri,
            os.environ.get("NEO4J_USERNAME", "neo4j"),
            os.environ.get("NEO4J_PASSWORD", ""),
            os.environ.get("NEO4J_DATABASE", "neo4j"),
        )
        return
    from neopool.embedded import BoltServer

    print("starting the embedded Bolt server (ArcadeDB)...", file=sys.stderr)
    defaults = ("-Xms64m", "-Xmx1g", "-XX:+UseSerialGC")
    with BoltServer(java_options=defaults + java_options) as server:
        yield Target(server.uri, server.username, server.password)


@contextlib.contextmanager
def network(target: Target, rtt_ms: float, tls: bool = False) -> Iterator[Target]:
    """The target itself on loopback, or through the latency proxy at ``rtt_ms``.

    ``tls``: through a proxy process that terminates TLS in front of the target
    (a throwaway certificate; the driver connects with ``+ssc``). Its latency acts
    on the TLS records, so a new connection's TLS handshake pays its round trips,
    as between a worker and an encrypted server on a real network.
    """
    if rtt_ms <= 0 and not tls:
        yield target
        return
    from urllib.parse import urlsplit

    from neopool.testing import ProxyProcess, TlsCertificates

    parts = urlsplit(target.uri)
    assert parts.hostname is not None
    assert parts.port is not None
    scheme = parts.scheme
    if tls and "+" in scheme:
        raise ValueError(f"{target.uri} is encrypted already: measure it as plain")
    with contextlib.ExitStack() as stack:
        cert = key = None
        if tls:
            certificates = stack.enter_context(TlsCertificates())
            cert, key = certificates.cert_path, certificates.key_path
            scheme += "+ssc"
        # A process of its own: the stand-in network must not share the GIL with what is timed.
        proxy = ProxyProcess(parts.hostname, parts.port, rtt_ms=rtt_ms, tls_cert=cert, tls_key=key)
        stack.enter_context(proxy)
        yield Target(proxy.uri(scheme), target.username, target.password, target.database)


def network_label(rtt_ms: float, tls: bool = False) -> str:
    """``loopback`` or ``2 ms RTT``, after ``TLS`` when encrypted."""
    label = "loopback" if rtt_ms <= 0 else f"{rtt_ms:g} ms RTT"
    return f"TLS {label}" if tls else label


def networks(args: argparse.Namespace) -> Iterator[tuple[float, bool]]:
    """``(rtt_ms, tls)`` for every network the options ask for, plain ones first."""
    for transport in args.transport:
        for rtt in args.rtt_ms:
            yield rtt, transport == "tls"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    cli = argparse.ArgumentParser(description=description)
    cli.add_argument(
        "--quick", action="store_true", help="a short run (fewer iterations) for a smoke test"
    )
    cli.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write results (default results/<name>.json)",
    )
    cli.add_argument(
        "--rtt-ms",
        type=float,
        nargs="+",
        default=[0.0, 2.0],
        help="network settings to measure: 0 is direct loopback, >0 goes through the "
        "latency proxy adding that round-trip time (default: 0 2)",
    )
    cli.add_argument(
        "--transport",
        choices=("plain", "tls"),
        nargs="+",
        default=["plain"],
        help="plain Bolt, and/or TLS through a proxy process that terminates it "
        "(with the latency of --rtt-ms in front, so the handshake pays it)",
    )
    return cli


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


#: The machine's load when the benchmark started (others' work skews the figures).
START_LOAD = _load_average()


def save(name: str, data: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``results/<name>.json`` (or ``path``) with the machine described."""
    machine = {
        **machine_info(),
        "load_average_at_start": START_LOAD,
        "load_average_at_end": _load_average(),
    }
    document = {"benchmark": name, **data, "machine": machine}
    written = write_json(document, path or RESULTS_DIR / f"{name}.json")
    print(f"results written to {written}")
    return written


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table (rich)."""
    print_table(title, columns, rows)
