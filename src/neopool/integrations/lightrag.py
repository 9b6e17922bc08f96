"""LightRAG's Neo4j graph storage, borrowing the loop's pooled driver.

lightrag-hku's ``Neo4JStorage.initialize`` opens a driver and probes, creates
and indexes its database; ``finalize`` closes the driver. A worker that builds
a LightRAG per task pays all of that per task. :class:`PooledNeo4JStorage`
keeps every query of ``Neo4JStorage`` and changes only where the driver comes
from, exactly as the design note shows: ``initialize`` borrows a connection
(``__aenter__``) and prepares the workspace's database through the process-wide
cache; ``finalize`` returns it (``__aexit__``). Storages of one event loop share
its one driver.

>>> from neopool.integrations.lightrag import register   # doctest: +SKIP
>>> register()
>>> rag = LightRAG(graph_storage="PooledNeo4JStorage", ...)

The server and pool settings come from ``GlobalNeo4jConnectionPool.set_config``
or, if none was set, from the same ``NEO4J_*`` variables LightRAG reads.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from lightrag.kg.neo4j_impl import Neo4JStorage
from neo4j import AsyncDriver

from neopool.borrowed import BorrowedConnection
from neopool.database import database_name_for
from neopool.factory import Neo4jConnectionFactory

logger = logging.getLogger("neopool")

STORAGE_NAME = "PooledNeo4JStorage"

#: (uri, user, database, label) whose full-text index this process has ensured.
_fulltext_done: set[tuple[str, str, str | None, str]] = set()
_fulltext_lock = threading.Lock()


class PooledNeo4JStorage(Neo4JStorage):  # type: ignore[misc]
    """``Neo4JStorage`` on a borrowed connection of the running loop's pool."""

    def __init__(
        self,
        namespace: str,
        global_config: dict[str, Any],
        embedding_func: Any,
        workspace: Any = None,
    ) -> None:
        super().__init__(namespace, global_config, embedding_func, workspace)
        self._borrowed_connection: BorrowedConnection | None = None
        self._driver: AsyncDriver | None = None

    async def initialize(self) -> None:
        """Borrow a connection and prepare this workspace's database (cached per process)."""
        if self._borrowed_connection is not None:
            return  # initialised already; LightRAG may call this more than once
        borrowed = Neo4jConnectionFactory.borrow_connection()
        await borrowed.__aenter__()
        self._borrowed_connection = borrowed
        try:
            self._driver = await borrowed.get_driver()
            # Neo4JStorage names the database after the namespace, not the workspace.
            self._DATABASE = await borrowed.prepare_database(
                self.workspace, database_name_for(self.namespace)
            )
            await self._ensure_fulltext_index()
        except BaseException:
            self._borrowed_connection = None
            self._driver = None
            await borrowed.__aexit__(*sys.exc_info())
            raise

    async def finalize(self) -> None:
        """Return the connection to the pool; the driver stays open for the next borrower."""
        borrowed, self._borrowed_connection = self._borrowed_connection, None
        self._driver = None
        if borrowed is not None:
            await borrowed.__aexit__(None, None, None)

    async def _ensure_fulltext_index(self) -> None:
        """LightRAG's full-text index on ``entity_id``, ensured once per process."""
        connection = self._borrowed_connection.connection if self._borrowed_connection else None
        if connection is None:
            return
        label = self._get_workspace_label()
        key = (*connection.pool.config.server_key, self._DATABASE, label)
        with _fulltext_lock:
            if key in _fulltext_done:
                return
            _fulltext_done.add(key)
        create = getattr(self, "_create_fulltext_index", None)  # lightrag-hku >= 1.4.x
        if create is not None:
            await create(self._driver, self._DATABASE, label)


def register() -> None:
    """Make ``LightRAG(graph_storage="PooledNeo4JStorage")`` resolve to this class.

    Safe to call more than once. Adds the name to LightRAG's storage registry
    and list of graph storages; it needs no environment variables of its own.
    """
    from lightrag import kg

    kg.STORAGES[STORAGE_NAME] = __name__
    implementations = kg.STORAGE_IMPLEMENTATIONS["GRAPH_STORAGE"]["implementations"]
    if STORAGE_NAME not in implementations:
        implementations.append(STORAGE_NAME)
    kg.STORAGE_ENV_REQUIREMENTS.setdefault(STORAGE_NAME, [])


def _forget_fulltext_indexes() -> None:
    """Forget which full-text indexes were ensured (tests that drop databases)."""
    with _fulltext_lock:
        _fulltext_done.clear()


__all__ = ["STORAGE_NAME", "PooledNeo4JStorage", "register"]
