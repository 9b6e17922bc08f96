"""Database preparation, done once per process and workspace.

Follows LightRAG's ``Neo4JStorage.initialize``: the database is
``NEO4J_DATABASE`` or a name derived from the workspace; it is probed, created
where the server can (``CREATE DATABASE``), and where it cannot (Neo4j
Community, ArcadeDB, no permission) the default database is used instead. Then
an index on ``entity_id`` is ensured for the workspace label.

The result is cached process-wide: the second call, from any event loop or
thread, runs no Cypher. Concurrent first calls run the preparation once and
all get its result. Workspace strings never reach Cypher unquoted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import threading
from typing import Any

from neo4j import AsyncDriver
from neo4j.exceptions import AuthError, ClientError, DatabaseError

from neopool.config import Neo4jConnectionConfig

logger = logging.getLogger("neopool")

DEFAULT_WORKSPACE = "base"
SYSTEM_DATABASE = "system"
_DATABASE_NOT_FOUND = "Neo.ClientError.Database.DatabaseNotFound"

CacheKey = tuple[str, str, str, str]


def effective_workspace(config: Neo4jConnectionConfig, workspace: str | None) -> str:
    """LightRAG's rule: ``NEO4J_WORKSPACE`` wins, then the argument, then ``base``."""
    for candidate in (config.workspace, workspace):
        if candidate is not None and str(candidate).strip():
            return str(candidate).strip()
    return DEFAULT_WORKSPACE


def database_name_for(workspace: str) -> str:
    """The database LightRAG derives from a name: anything unusual becomes ``-``."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", workspace)


def quote_identifier(name: str) -> str:
    """A Cypher identifier in backticks, with backticks inside doubled."""
    return "`" + name.replace("`", "``") + "`"


class _Abandoned(Exception):
    """The caller running a preparation was cancelled; another one takes over."""


class DatabasePreparer:
    """The process-wide cache of prepared (server, database, workspace) triples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prepared: dict[CacheKey, str | None] = {}
        self._running: dict[CacheKey, concurrent.futures.Future[str | None]] = {}
        #: Cypher statements run so far (the cache's effect, in one number).
        self.statements_run = 0

    async def prepare(
        self,
        driver: AsyncDriver,
        config: Neo4jConnectionConfig,
        workspace: str | None,
        database: str | None = None,
    ) -> str | None:
        """The database to use for ``workspace``; prepared on first call only.

        The database is ``NEO4J_DATABASE`` if set, else ``database`` if given,
        else a name derived from the workspace. Returns the database actually
        used, or ``None`` where the server's default database had to be used and
        its name could not be learned.
        """
        workspace = effective_workspace(config, workspace)
        target = config.database or database or database_name_for(workspace)
        key: CacheKey = (*config.server_key, target, workspace)
        while True:
            with self._lock:
                if key in self._prepared:
                    return self._prepared[key]
                running = self._running.get(key)
                if running is None:
                    mine: concurrent.futures.Future[str | None] = concurrent.futures.Future()
                    self._running[key] = mine
            if running is None:
                return await self._lead(key, mine, driver, target, workspace)
            try:
                return await asyncio.shield(asyncio.wrap_future(running))
            except _Abandoned:
                continue

    async def _lead(
        self,
        key: CacheKey,
        future: concurrent.futures.Future[str | None],
        driver: AsyncDriver,
        target: str,
        workspace: str,
    ) -> str | None:
        try:
            database = await self._prepare(driver, target, workspace)
        except BaseException as exc:
            with self._lock:
                self._running.pop(key, None)
            future.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
            raise
        with self._lock:
            self._prepared[key] = database
            self._running.pop(key, None)
        future.set_result(database)
        return database

    async def _prepare(self, driver: AsyncDriver, target: str, workspace: str) -> str | None:
        database = await self._open_or_create(driver, target)
        await self._ensure_index(driver, database, workspace)
        logger.info(
            "neopool: workspace %r prepared in database %r", workspace, database or "(default)"
        )
        return database

    async def _open_or_create(self, driver: AsyncDriver, target: str) -> str | None:
        try:
            await self._run(driver, target, "MATCH (n) RETURN n LIMIT 0")
            return target
        except AuthError:
            raise
        except ClientError as exc:
            if exc.code != _DATABASE_NOT_FOUND:
                raise
        try:
            await self._administer(
                driver, f"CREATE DATABASE {quote_identifier(target)} IF NOT EXISTS WAIT"
            )
            logger.info("neopool: created database %r", target)
            return target
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.warning(
                "neopool: database %r does not exist and this server cannot create it (%s); "
                "using the default database. Set NEO4J_DATABASE to choose one.",
                target,
                exc.code,
            )
        return await self._default_database(driver)

    async def _default_database(self, driver: AsyncDriver) -> str | None:
        """The name of the user's home (or the server's default) database, if shown."""
        try:
            rows = await self._administer(driver, "SHOW DATABASES")
        except AuthError:
            raise
        except (ClientError, DatabaseError):
            return None
        for flag in ("home", "default"):
            for row in rows:
                if row.get(flag) is True and isinstance(row.get("name"), str):
                    return str(row["name"])
        return None

    async def _ensure_index(
        self, driver: AsyncDriver, database: str | None, workspace: str
    ) -> None:
        query = f"CREATE INDEX IF NOT EXISTS FOR (n:{quote_identifier(workspace)}) ON (n.entity_id)"
        try:
            await self._run(driver, database, query)
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.warning("neopool: could not index entity_id for %r: %s", workspace, exc.code)

    async def _administer(self, driver: AsyncDriver, query: str) -> list[dict[str, Any]]:
        """Run an administration command where Neo4j expects it: the system database."""
        try:
            return await self._run(driver, SYSTEM_DATABASE, query)
        except ClientError as exc:
            if exc.code != _DATABASE_NOT_FOUND:
                raise
        return await self._run(driver, None, query)

    async def _run(
        self, driver: AsyncDriver, database: str | None, query: str
    ) -> list[dict[str, Any]]:
        self.statements_run += 1
        async with driver.session(database=database) as session:
            result = await session.run(query)
            return await result.data()

    # -- inspection and reset ------------------------------------------------------
    def prepared(self) -> dict[CacheKey, str | None]:
        """A copy of the cache: ``(uri, user, wanted database, workspace) -> database used``."""
        with self._lock:
            return dict(self._prepared)

    def clear(self) -> None:
        """Forget every prepared database (the next call prepares again)."""
        with self._lock:
            self._prepared.clear()

    def _after_fork_in_child(self) -> None:
        # Preparations running in the parent's threads will never finish here.
        self._lock = threading.Lock()
        self._running = {}


#: The process-wide cache used by :meth:`BorrowedConnection.prepare_database`.
preparer = DatabasePreparer()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: preparer._after_fork_in_child())
