"""Where tests find a Bolt server, and how they leave the registry clean."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from neopool.config import Neo4jConnectionConfig
from neopool.database import preparer
from neopool.embedded.arcadedb import BoltServer
from neopool.registry import GlobalNeo4jConnectionPool
from neopool.stats import LoopChurnMonitor


@dataclass(frozen=True)
class BoltTarget:
    """A Bolt server to test against: embedded ArcadeDB or a real Neo4j."""

    uri: str
    username: str
    password: str = field(repr=False)
    embedded: BoltServer | None = None

    @property
    def is_neo4j(self) -> bool:
        """Whether this is a real Neo4j given through the environment."""
        return self.embedded is None

    def config(self, **settings: Any) -> Neo4jConnectionConfig:
        """A config for this server; ``settings`` override the defaults."""
        return Neo4jConnectionConfig(
            uri=settings.pop("uri", self.uri),
            username=self.username,
            password=self.password,
            **settings,
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
    """End every pool of the process, forget the configuration, prepared databases and churn.

    For use between tests, from synchronous code: each pool ends as its loop
    allows (:meth:`GlobalNeo4jConnectionPool.shutdown`), within ``timeout``.
    """
    registry = GlobalNeo4jConnectionPool()
    registry.shutdown(timeout)
    with registry._lock:
        registry._config = None
        registry._churn = LoopChurnMonitor()
    preparer.clear()
