"""Database preparation, done once per process and workspace.

Follows LightRAG's ``Neo4JStorage.initialize``: the database is
``NEO4J_DATABASE`` or a name derived from the workspace; it is probed, created
where the server can (``CREATE DATABASE``), and where it cannot (Neo4j
Community, ArcadeDB, no permission) the default database is used instead. Then
``entity_id`` is made unique on the workspace label (a uniqueness constraint,
which also indexes it), so that writers in several processes cannot create two
nodes for one entity; where existing duplicates or the server prevent that, the
plain index LightRAG creates is ensured instead and one warning says how many
duplicates there are and how to fix them.

The result is cached process-wide: the second call, from any event loop or
thread, runs no Cypher. Concurrent first calls run the preparation once and
all get its result. Every call is bounded by ``prepare_timeout``, waiting for
another caller included; a caller that is past its own bound (its loop blocked
or closed) is taken over. Workspace strings never reach Cypher unquoted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from neo4j import AsyncDriver
from neo4j.exceptions import AuthError, ClientError, DatabaseError, Neo4jError

from neopool import _fork
from neopool.config import SURROGATE_FIX, Neo4jConnectionConfig, utf8_problem
from neopool.errors import InvalidName, PrepareTimeout

logger = logging.getLogger("neopool")

DEFAULT_WORKSPACE = "base"
SYSTEM_DATABASE = "system"
_DATABASE_NOT_FOUND = "Neo.ClientError.Database.DatabaseNotFound"

#: Characters of a name that logs and errors show; the rest is only counted.
SHOWN_CHARACTERS = 60

CacheKey = tuple[str, str, str, str]


def shown(name: str | None) -> str:
    """A name as logs and errors show it: quoted like ``repr``, so control
    characters cannot forge log lines, and cut short, so a huge name cannot flood them."""
    if name is None:
        return "(default)"
    if len(name) <= SHOWN_CHARACTERS:
        return repr(name)
    return f"{name[:SHOWN_CHARACTERS]!r}…({len(name)} characters)"


def checked_name(name: str, what: str = "workspace") -> str:
    """``name`` itself, if the server can be sent it; else :class:`InvalidName`."""
    problem = utf8_problem(name)
    if problem is not None:
        raise InvalidName(f"{what} {shown(name)} {problem}; {SURROGATE_FIX}")
    return name


def effective_workspace(config: Neo4jConnectionConfig, workspace: str | None) -> str:
    """LightRAG's rule: ``NEO4J_WORKSPACE`` wins, then the argument, then ``base``."""
    for candidate in (config.workspace, workspace):
        if candidate is not None and str(candidate).strip():
            return checked_name(str(candidate).strip())
    return DEFAULT_WORKSPACE


def database_name_for(workspace: str) -> str:
    """The database LightRAG derives from a name: anything unusual becomes ``-``."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", checked_name(workspace))


def quote_identifier(name: str) -> str:
    """A Cypher identifier in backticks, with backticks inside doubled."""
    return "`" + name.replace("`", "``") + "`"


class _Abandoned(Exception):
    """The caller running a preparation was cancelled or overran; another one takes over."""


@dataclass(eq=False)
class _Preparation:
    """One caller's run of a preparation, which concurrent callers wait for."""

    #: When its caller gives up (``time.monotonic()``); a run still going after it is stuck.
    deadline: float
    #: Running from the start, so a waiter that gives up can never cancel it for the others.
    future: concurrent.futures.Future[str | None] = field(default_factory=concurrent.futures.Future)

    def __post_init__(self) -> None:
        self.future.set_running_or_notify_cancel()


class DatabasePreparer:
    """The process-wide cache of prepared (server, database, workspace) triples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prepared: dict[CacheKey, str | None] = {}
        self._running: dict[CacheKey, _Preparation] = {}
        #: Cypher statements run so far (the cache's effect, in one number).
        self.statements_run = 0
        #: ``(database, workspace) -> whether entity_id is unique there``, as prepared.
        self.unique_entity_ids: dict[tuple[str | None, str], bool] = {}

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
        its name could not be learned. Raises :class:`PrepareTimeout` after
        ``prepare_timeout`` seconds, and :class:`InvalidName` (before any
        Cypher) for a name the server cannot be sent.
        """
        workspace = effective_workspace(config, workspace)
        if database is not None:
            checked_name(database, "database")
        target = config.database or database or database_name_for(workspace)
        key: CacheKey = (*config.server_key, target, workspace)
        deadline = time.monotonic() + config.prepare_timeout
        while True:
            overran = False
            with self._lock:
                if key in self._prepared:
                    return self._prepared[key]
                running = self._running.get(key)
                if running is not None and running.deadline <= time.monotonic():
                    # Its caller is past its own bound, so its loop is blocked or gone.
                    running.future.set_exception(_Abandoned())  # its waiters come back here
                    running, overran = None, True
                if running is None:
                    mine = self._running[key] = _Preparation(deadline)
            if running is None:
                if overran:
                    logger.warning(
                        "neopool: the preparation of workspace %s overran its prepare_timeout "
                        "(its event loop may be blocked or closed); preparing it again",
                        shown(workspace),
                    )
                return await self._lead(key, mine, driver, target, workspace, config)
            try:
                return await self._follow(running, deadline, workspace, config)
            except _Abandoned:
                continue

    async def _lead(
        self,
        key: CacheKey,
        mine: _Preparation,
        driver: AsyncDriver,
        target: str,
        workspace: str,
        config: Neo4jConnectionConfig,
    ) -> str | None:
        try:
            database = await asyncio.wait_for(
                self._prepare(driver, target, workspace), mine.deadline - time.monotonic()
            )
        except asyncio.TimeoutError:
            error = _timeout(
                f"preparing workspace {shown(workspace)} did not finish within "
                f"{config.prepare_timeout:g}s: the server did not answer in time",
                workspace,
                config,
            )
            self._finish(key, mine, error=error)
            raise error from None
        except BaseException as exc:
            self._finish(key, mine, error=exc if isinstance(exc, Exception) else _Abandoned())
            raise
        self._finish(key, mine, result=database)
        return database

    def _finish(
        self,
        key: CacheKey,
        mine: _Preparation,
        *,
        result: str | None = None,
        error: Exception | None = None,
    ) -> None:
        """Record the outcome; tell the waiters, unless another caller took them over."""
        with self._lock:
            if self._running.get(key) is mine:
                del self._running[key]
            if error is None:
                self._prepared[key] = result
            if mine.future.done():
                return
            if error is None:
                mine.future.set_result(result)
            else:
                mine.future.set_exception(error)

    async def _follow(
        self,
        running: _Preparation,
        deadline: float,
        workspace: str,
        config: Neo4jConnectionConfig,
    ) -> str | None:
        """Wait for another caller's preparation until our deadline or its own."""
        waiting = asyncio.wrap_future(running.future)
        try:
            timeout = min(deadline, running.deadline) - time.monotonic()
            await asyncio.wait({waiting}, timeout=max(timeout, 0.0))
        finally:
            waiting.cancel()  # stops only this wait: a running future cannot be cancelled
        if not waiting.cancelled():
            return waiting.result()  # its database, or its error, or _Abandoned
        if running.deadline < deadline:
            raise _Abandoned()  # it overran its own bound first: take over
        raise _timeout(
            f"workspace {shown(workspace)} was still being prepared by another caller "
            f"after {config.prepare_timeout:g}s (its event loop may be blocked, or the "
            f"server slow)",
            workspace,
            config,
        )

    async def _prepare(self, driver: AsyncDriver, target: str, workspace: str) -> str | None:
        database = await self._open_or_create(driver, target)
        await self._ensure_unique_entity_ids(driver, database, workspace)
        logger.info(
            "neopool: workspace %s prepared in database %s", shown(workspace), shown(database)
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
            logger.info("neopool: created database %s", shown(target))
            return target
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.warning(
                "neopool: database %s does not exist and this server cannot create it (%s); "
                "using the default database. Set NEO4J_DATABASE to choose one.",
                shown(target),
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

    async def _ensure_unique_entity_ids(
        self, driver: AsyncDriver, database: str | None, workspace: str
    ) -> None:
        """Make ``entity_id`` unique on the workspace label; else index it and say why not.

        The constraint comes first: its own index serves every lookup the plain
        one did, and on Neo4j a plain index on the same property would block it.
        A workspace that already has the plain index (LightRAG made it, or an
        older neopool) gets it replaced where the server insists, if the data
        has no duplicates. Every outcome is final for this process (the
        preparation is cached); a duplicate-free later run fixes itself.
        """
        label = quote_identifier(workspace)
        try:
            await self._run(driver, database, _unique_constraint(label))
            self.unique_entity_ids[(database, workspace)] = True
            return
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            refused: Neo4jError = exc
        if await self._has_unique_constraint(driver, database, workspace):
            # Another process created it at the same moment (or in another form).
            self.unique_entity_ids[(database, workspace)] = True
            return
        duplicates = await self._count_duplicates(driver, database, label)
        if (
            duplicates == (0, 0)
            and _blocked_by_plain_index(refused)
            and await self._replace_plain_index(driver, database, workspace, label)
        ):
            self.unique_entity_ids[(database, workspace)] = True
            return
        self.unique_entity_ids[(database, workspace)] = False
        await self._ensure_index(driver, database, workspace)
        _warn_not_unique(workspace, database, duplicates, refused)

    async def _has_unique_constraint(
        self, driver: AsyncDriver, database: str | None, workspace: str
    ) -> bool:
        try:
            rows = await self._run(driver, database, _UNIQUE_CONSTRAINTS, label=workspace)
        except AuthError:
            raise
        except (ClientError, DatabaseError):
            return False
        return bool(rows) and int(rows[0]["n"] or 0) > 0

    async def _count_duplicates(
        self, driver: AsyncDriver, database: str | None, label: str
    ) -> tuple[int, int] | None:
        """``(entity_ids with more than one node, extra nodes)``; ``None`` if it cannot tell."""
        try:
            rows = await self._run(driver, database, _DUPLICATES.format(label=label))
        except AuthError:
            raise
        except (ClientError, DatabaseError):
            return None
        if not rows:
            return (0, 0)
        return int(rows[0]["ids"] or 0), int(rows[0]["extra"] or 0)

    async def _replace_plain_index(
        self, driver: AsyncDriver, database: str | None, workspace: str, label: str
    ) -> bool:
        """Drop the plain ``entity_id`` index that blocks the constraint, then add the constraint.

        If the constraint still fails (a duplicate written meanwhile), the
        plain index is put back by the caller: lookups are never left unindexed
        for longer than this takes.
        """
        try:
            rows = await self._run(driver, database, _PLAIN_INDEXES, label=workspace)
            for row in rows:
                await self._run(
                    driver, database, f"DROP INDEX {quote_identifier(row['name'])} IF EXISTS"
                )
            await self._run(driver, database, _unique_constraint(label))
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.info(
                "neopool: could not replace the entity_id index of workspace %s by a "
                "uniqueness constraint (%s)",
                shown(workspace),
                exc.code,
            )
            return False
        logger.info(
            "neopool: replaced the entity_id index of workspace %s by a uniqueness constraint",
            shown(workspace),
        )
        return True

    async def _ensure_index(
        self, driver: AsyncDriver, database: str | None, workspace: str
    ) -> None:
        query = f"CREATE INDEX IF NOT EXISTS FOR (n:{quote_identifier(workspace)}) ON (n.entity_id)"
        try:
            await self._run(driver, database, query)
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.warning(
                "neopool: could not index entity_id for %s: %s", shown(workspace), exc.code
            )

    async def _administer(self, driver: AsyncDriver, query: str) -> list[dict[str, Any]]:
        """Run an administration command where Neo4j expects it: the system database."""
        try:
            return await self._run(driver, SYSTEM_DATABASE, query)
        except ClientError as exc:
            if exc.code != _DATABASE_NOT_FOUND:
                raise
        return await self._run(driver, None, query)

    async def _run(
        self, driver: AsyncDriver, database: str | None, query: str, **parameters: Any
    ) -> list[dict[str, Any]]:
        self.statements_run += 1
        async with driver.session(database=database) as session:
            result = await session.run(query, parameters)
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
            self.unique_entity_ids.clear()

    def after_fork_in_child(self) -> None:
        # Preparations running in the parent's threads will never finish here.
        self._lock = threading.Lock()
        self._running = {}


#: Entity ids with more than one node, and how many nodes are extra.
_DUPLICATES = (
    "MATCH (n:{label}) WHERE n.entity_id IS NOT NULL "
    "WITH n.entity_id AS id, count(*) AS copies WHERE copies > 1 "
    "RETURN count(id) AS ids, coalesce(sum(copies - 1), 0) AS extra"
)
#: Uniqueness constraints on the workspace label's entity_id (Neo4j 4.4 and 5 type names).
_UNIQUE_CONSTRAINTS = (
    "SHOW CONSTRAINTS YIELD type, labelsOrTypes, properties "
    "WHERE labelsOrTypes = [$label] AND properties = ['entity_id'] "
    "AND type IN ['UNIQUENESS', 'NODE_PROPERTY_UNIQUENESS'] RETURN count(*) AS n"
)
#: The plain (not constraint-owned) indexes on the workspace label's entity_id.
_PLAIN_INDEXES = (
    "SHOW INDEXES YIELD name, type, labelsOrTypes, properties, owningConstraint "
    "WHERE type = 'RANGE' AND labelsOrTypes = [$label] AND properties = ['entity_id'] "
    "AND owningConstraint IS NULL RETURN name"
)
_DUPLICATES_HINT = (
    "MATCH (n:{label}) WITH n.entity_id AS id, count(*) AS copies WHERE copies > 1 "
    "RETURN id, copies"
)


def _unique_constraint(label: str) -> str:
    return f"CREATE CONSTRAINT IF NOT EXISTS FOR (n:{label}) REQUIRE n.entity_id IS UNIQUE"


def _blocked_by_plain_index(error: Neo4jError) -> bool:
    """Whether the constraint was refused only because a plain index covers the property."""
    message = (error.message or "").lower()
    return error.code == "Neo.ClientError.Schema.IndexAlreadyExists" or (
        "index" in message and "constraint cannot be created" in message
    )


def _warn_not_unique(
    workspace: str,
    database: str | None,
    duplicates: tuple[int, int] | None,
    refused: Neo4jError,
) -> None:
    """The one warning of a workspace whose entity_id could not be made unique."""
    label = quote_identifier(workspace)
    if workspace.isprintable() and len(workspace) <= SHOWN_CHARACTERS:
        constraint, listing = _unique_constraint(label), _DUPLICATES_HINT.format(label=label)
    else:  # the statements would carry the name unquoted into the log: describe them
        constraint = "CREATE CONSTRAINT IF NOT EXISTS FOR (n:<workspace label>) " + (
            "REQUIRE n.entity_id IS UNIQUE"
        )
        listing = _DUPLICATES_HINT.format(label="<workspace label>")
    if duplicates is not None and duplicates[0]:
        ids, extra = duplicates
        logger.warning(
            "neopool: entity_id is not unique in workspace %s (database %s): %d entity_id "
            "value(s) have more than one node (%d extra node(s)), so the server refused a "
            "uniqueness constraint (%s). Kept the plain index; concurrent writers in several "
            "processes may create more duplicates. Fix: merge or delete the extra nodes "
            "(list them with: %s), then run: %s (or restart the workers: neopool adds it "
            "when it prepares the workspace).",
            shown(workspace),
            shown(database),
            ids,
            extra,
            refused.code,
            listing,
            constraint,
        )
        return
    counted = "no duplicates found" if duplicates is not None else "duplicates not counted"
    logger.warning(
        "neopool: this server refused a uniqueness constraint on entity_id for workspace %s "
        "(database %s): %s (%s). Kept the plain index; concurrent writers in several "
        "processes may create duplicate entities. Fix: use a server that supports "
        "uniqueness constraints (Neo4j 5, ArcadeDB) with the CREATE CONSTRAINT privilege, "
        "then run: %s",
        shown(workspace),
        shown(database),
        refused.code,
        counted,
        constraint,
    )


def _timeout(problem: str, workspace: str, config: Neo4jConnectionConfig) -> PrepareTimeout:
    return PrepareTimeout(
        f"{problem}. Check that the server is reachable and answering, or raise "
        f"prepare_timeout (NEOPOOL_PREPARE_TIMEOUT).",
        workspace,
        config.prepare_timeout,
    )


#: The process-wide cache used by :meth:`BorrowedConnection.prepare_database`.
preparer = DatabasePreparer()
_fork.add_step(_fork.Step.DATABASE, preparer.after_fork_in_child)
