"""Test helpers: real servers for your own test suite.

Add ``pytest_plugins = ["neopool.testing.plugin"]`` to your ``conftest.py`` to
get session-scoped fixtures with a real Bolt server (embedded ArcadeDB, or your
Neo4j when ``NEOPOOL_TEST_NEO4J_URI``, ``_USER`` and ``_PASSWORD`` are set) and
a real Celery broker (embedded Valkey). :class:`TcpProxy` sits between a
driver and its server to cut, blackhole or slow the network on purpose
(:class:`ProxyProcess` runs one as a child process, for measurements;
:class:`TlsProxy` terminates TLS with a throwaway CA's certificate from
:class:`TlsCertificates`, so the driver can be tested over TLS), and
:class:`WriteLoad` keeps writers busy on many loops while a drill breaks things,
counting every write the server acknowledged.
:func:`tls_target` puts a verified TLS proxy in front of a :class:`BoltTarget`;
with ``NEOPOOL_TEST_TLS=1`` the plugin's fixtures do that for the whole run.

:class:`FakeDriverFactory` is a test double, not a database: its
:class:`FakeDriver` objects only verify and close (and can be told to hang or
fail doing so), for fast state-machine tests of the pools' lifecycle; pass it
as ``driver_factory=`` or to ``GlobalNeo4jConnectionPool.set_driver_factory``.
"""

from neopool.testing.fake_driver import FakeDriver, FakeDriverFactory
from neopool.testing.proxy import TcpProxy, TlsProxy
from neopool.testing.proxy_process import ProxyProcess
from neopool.testing.targets import (
    BoltTarget,
    bolt_target_from_env,
    reset_registry,
    tls_requested,
    tls_target,
)
from neopool.testing.tls import TlsCertificates
from neopool.testing.write_load import WriteLoad

__all__ = [
    "BoltTarget",
    "FakeDriver",
    "FakeDriverFactory",
    "ProxyProcess",
    "TcpProxy",
    "TlsCertificates",
    "TlsProxy",
    "WriteLoad",
    "bolt_target_from_env",
    "reset_registry",
    "tls_requested",
    "tls_target",
]
