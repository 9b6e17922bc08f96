"""Test helpers: real servers for your own test suite.

Add ``pytest_plugins = ["neopool.testing.plugin"]`` to your ``conftest.py`` to
get session-scoped fixtures with a real Bolt server (embedded ArcadeDB, or your
Neo4j when ``NEOPOOL_TEST_NEO4J_URI``, ``_USER`` and ``_PASSWORD`` are set) and
a real Celery broker (embedded Valkey). :class:`TcpProxy` sits between a
driver and its server to cut, blackhole or slow the network on purpose.
"""

from neopool.testing.proxy import TcpProxy
from neopool.testing.targets import BoltTarget, bolt_target_from_env, reset_registry

__all__ = ["BoltTarget", "TcpProxy", "bolt_target_from_env", "reset_registry"]
