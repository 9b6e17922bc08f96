"""Test helpers: real servers for your own test suite.

Add ``pytest_plugins = ["neopool.testing.plugin"]`` to your ``conftest.py`` to
get session-scoped fixtures with a real Bolt server (embedded ArcadeDB, or your
Neo4j when ``NEOPOOL_TEST_NEO4J_URI``, ``_USER`` and ``_PASSWORD`` are set) and
a real Celery broker (embedded Valkey). :class:`TcpProxy` sits between a
driver and its server to cut, blackhole or slow the network on purpose
(:class:`ProxyProcess` runs one as a child process, for measurements), and
:class:`WriteLoad` keeps writers busy on many loops while a drill breaks things,
counting every write the server acknowledged.
"""

from neopool.testing.proxy import TcpProxy
from neopool.testing.proxy_process import ProxyProcess
from neopool.testing.targets import BoltTarget, bolt_target_from_env, reset_registry
from neopool.testing.write_load import WriteLoad

__all__ = [
    "BoltTarget",
    "ProxyProcess",
    "TcpProxy",
    "WriteLoad",
    "bolt_target_from_env",
    "reset_registry",
]
