"""neopool: one Neo4j driver per event loop, borrowed and returned.

The layers, from the outside in::

    GlobalNeo4jConnectionPool     process-wide registry, one pool per event loop
      EventLoopConnectionPool     one loop's driver and its leases
        PooledConnectionManager   a lease: the right to use that driver for a while
          neo4j.AsyncDriver       the official driver, which pools the sockets

``Neo4jConnectionFactory.borrow_connection()`` wraps a borrow in ``async with``.
"""

from neopool import _fork  # noqa: F401  (registers the fork hook)
from neopool._version import __version__
from neopool.borrowed import BorrowedConnection, PooledSession
from neopool.config import Neo4jConnectionConfig
from neopool.database import Schema
from neopool.errors import (
    CallCancelled,
    ConfigError,
    CredentialsTimeout,
    InvalidName,
    LeaseError,
    LoopAlreadyRunning,
    MissingDatabase,
    NeopoolError,
    NoRunningLoop,
    PoolClosed,
    PoolTimeout,
    PrepareTimeout,
    UnsafeStatsDir,
)
from neopool.factory import Neo4jConnectionFactory
from neopool.lease import PooledConnectionManager
from neopool.loop_pool import EventLoopConnectionPool
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.runner import run
from neopool.stats import PoolStats, ProcessTotals

__all__ = [
    "BorrowedConnection",
    "CallCancelled",
    "ConfigError",
    "CredentialsTimeout",
    "EventLoopConnectionPool",
    "GlobalNeo4jConnectionPool",
    "InvalidName",
    "LeaseError",
    "LoopAlreadyRunning",
    "MissingDatabase",
    "Neo4jConnectionConfig",
    "Neo4jConnectionFactory",
    "NeopoolError",
    "NoRunningLoop",
    "PoolClosed",
    "PoolStats",
    "PoolTimeout",
    "PooledConnectionManager",
    "PooledSession",
    "PrepareTimeout",
    "ProcessTotals",
    "Schema",
    "UnsafeStatsDir",
    "__version__",
    "run",
]
