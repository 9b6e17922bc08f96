"""The servers a demo run needs: yours from the environment, or embedded ones.

``NEO4J_URI`` (with ``NEO4J_USERNAME``/``NEO4J_PASSWORD``/``NEO4J_DATABASE``)
selects your Bolt server, ``NEOPOOL_DEMO_BROKER_URL`` (or ``CELERY_BROKER_URL``)
your broker; otherwise ArcadeDB and Valkey are started on loopback for the run.
With ``rtt_ms > 0`` the workers reach the Bolt server through the latency proxy,
run as a process of its own so that it shares no interpreter with what is timed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from neopool.config import Neo4jConnectionConfig
from neopool.testing.proxy_process import ProxyProcess

BROKER_ENVS = ("NEOPOOL_DEMO_BROKER_URL", "CELERY_BROKER_URL")


@dataclass(frozen=True)
class Endpoints:
    """Where the workers connect, and what to tell the user about it."""

    config: Neo4jConnectionConfig
    broker_url: str
    bolt_description: str
    broker_description: str
    proxy: ProxyProcess | None


@contextlib.contextmanager
def demo_servers(rtt_ms: float, say: Callable[[str], None]) -> Iterator[Endpoints]:
    """Start (or find) the Bolt server, broker and proxy; stop what was started."""
    with contextlib.ExitStack() as stack:
        if os.environ.get("NEO4J_URI"):
            config = Neo4jConnectionConfig()
            bolt = f"your server at {config.uri} (NEO4J_URI)"
        else:
            from neopool.embedded import BoltServer

            say("starting the embedded Bolt server (ArcadeDB)...")
            server = stack.enter_context(BoltServer())
            config = server.config(database=server.database)
            bolt = f"embedded ArcadeDB at {server.uri}"

        broker_url = next((os.environ[n] for n in BROKER_ENVS if os.environ.get(n)), None)
        if broker_url:
            broker = "your broker (from the environment)"
        else:
            from neopool.embedded import BrokerServer

            say("starting the embedded broker (Valkey)...")
            broker_server = stack.enter_context(BrokerServer())
            broker_url = broker_server.url
            broker = f"embedded Valkey on port {broker_server.port}"

        proxy = None
        if rtt_ms > 0:
            parts = urlsplit(config.uri)
            assert parts.hostname is not None
            proxy = stack.enter_context(
                ProxyProcess(parts.hostname, parts.port or 7687, rtt_ms=rtt_ms)
            )
            # Through a proxy the routing driver would be sent around it: use bolt://.
            scheme = parts.scheme.replace("neo4j", "bolt")
            config = config.model_copy(update={"uri": proxy.uri(scheme)})
            bolt += f", through the latency proxy adding {rtt_ms:g} ms round-trip time"
        yield Endpoints(config, broker_url, bolt, broker, proxy)
