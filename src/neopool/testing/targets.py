"""Where tests find a Bolt server, and how they leave the registry clean."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from neopool.config import Neo4jConnectionConfig
from neopool.database import preparer
from neopool.embedded.arcadedb import BoltServer
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import LoopChurnMonitor

if TYPE_CHECKING:
    from neopool.testing.proxy import TlsProxy
    from neopool.testing.tls import TlsCertificates

#: Set to 1 to run the suite's Bolt traffic over TLS (see :func:`tls_requested`).
TLS_ENV = "NEOPOOL_TEST_TLS"


@dataclass(frozen=True)
class BoltTarget:
    """A Bolt server to test against: embedded ArcadeDB or a real Neo4j.

    In a TLS run (:func:`tls_requested`) the target is reached through a
    TLS-terminating proxy: :attr:`uri` is ``bolt://127.0.0.1:<proxy port>``,
    :attr:`trusted_certificates` holds the throwaway CA that signed the
    proxy's certificate (so :meth:`config` verifies it), and
    :attr:`server_uri` is where the server itself listens.
    """

    uri: str
    username: str
    password: str = field(repr=False)
    embedded: BoltServer | None = None
    #: CA files :attr:`uri` is verified against (empty: no TLS beyond the URI's scheme).
    trusted_certificates: tuple[str, ...] = ()
    #: The server's own URI, when :attr:`uri` reaches it through a TLS proxy.
    server_uri: str | None = None
    #: That TLS proxy (for its counters), if any.
    tls_proxy: TlsProxy | None = field(default=None, repr=False, compare=False)

    @property
    def is_neo4j(self) -> bool:
        """Whether this is a real Neo4j given through the environment."""
        return self.embedded is None

    @property
    def tls(self) -> bool:
        """Whether :attr:`uri` is encrypted."""
        return bool(self.trusted_certificates) or "+" in urlsplit(self.uri).scheme

    @property
    def server_address(self) -> tuple[str, int]:
        """Host and port of the server itself (where a proxy in front of it connects)."""
        parts = urlsplit(self.server_uri or self.uri)
        return parts.hostname or "127.0.0.1", parts.port or 7687

    def config(self, **settings: Any) -> Neo4jConnectionConfig:
        """A config for this server; ``settings`` override the defaults.

        The target's CA files are trusted for a ``bolt://`` or ``neo4j://``
        URI; with ``credentials=`` (a provider) no password is passed.
        """
        uri = settings.pop("uri", self.uri)
        if self.trusted_certificates and "+" not in urlsplit(uri).scheme:
            settings.setdefault("trusted_certificates", self.trusted_certificates)
        settings.setdefault("username", self.username)
        if settings.get("credentials") is None:
            settings.setdefault("password", self.password)
        return Neo4jConnectionConfig(uri=uri, **settings)


def tls_requested() -> bool:
    """Whether ``NEOPOOL_TEST_TLS`` asks for the suite's Bolt traffic to go over TLS."""
    return os.environ.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def tls_target(target: BoltTarget, certificates: TlsCertificates) -> Iterator[BoltTarget]:
    """``target`` reached through a TLS-terminating proxy, verified against a throwaway CA.

    The proxy (a :class:`~neopool.testing.TlsProxy` with ``certificates``)
    runs until the ``with`` block ends; the target it yields connects with
    ``bolt://127.0.0.1:<port>`` and ``trusted_certificates=(ca,)``.
    """
    from neopool.testing.proxy import TlsProxy

    host, port = target.server_address
    with TlsProxy(host, port, certificates) as proxy:
        yield BoltTarget(
            uri=f"bolt://127.0.0.1:{proxy.port}",
            username=target.username,
            password=target.password,
            embedded=target.embedded,
            trusted_certificates=(str(certificates.ca_path),),
            server_uri=target.server_uri or target.uri,
            tls_proxy=proxy,
        )


def bolt_target_from_env() -> BoltTarget | None:
    """The real Neo4j named by ``NEOPOOL_TEST_NEO4J_URI`` / ``_USER`` / ``_PASSWORD``."""
    uri = os.environ.get("NEOPOOL_TEST_NEO4J_URI")
    if not uri:
        return None
    return BoltTarget(
        uri=uri,
        username=os.environ.get("NEOPOOL_TEST_NEO4J_USER", "neo4j"),
        password=os.environ.get("NEOPOOL_TEST_NEO4J_PASSWORD", ""),
    )


def reset_registry(timeout: float = 5.0) -> None:
    """End every pool; forget the configuration, driver factory, prepared databases and churn.

    For use between tests, from synchronous code: each pool ends as its loop
    allows (:meth:`GlobalNeo4jConnectionPool.shutdown`), within ``timeout``.
    """
    registry = GlobalNeo4jConnectionPool()
    registry.shutdown(timeout)
    with registry._lock:
        registry._config = None
        registry._churn = LoopChurnMonitor()
    GlobalNeo4jConnectionPool.set_driver_factory()  # back to the default
    preparer.clear()
