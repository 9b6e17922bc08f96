"""Database preparation, done once per process and workspace.

Follows LightRAG's ``Neo4JStorage.initialize`` for the database: it is
``NEO4J_DATABASE`` or a name derived from the workspace; it is probed, created
where the server can (``CREATE DATABASE``), and where it cannot (Neo4j
Community, ArcadeDB, no permission) the default database is used instead, or,
with ``database_fallback`` off, :class:`~neopool.errors.MissingDatabase` is
raised and nothing is written.

What is created in it is the caller's :class:`Schema`: a uniqueness constraint
on a label's key (which also indexes it, and stops writers in several processes
from creating two nodes for one key; where existing duplicates or the server
prevent it, a plain index is ensured instead and one warning says how many
duplicates there are and how to fix them), a plain index, or nothing. An
existing plain index is replaced only for a caller that asked for the
constraint. The LightRAG integration asks for ``entity_id`` unique on the
workspace label.

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
from typing import Any, Literal

from neo4j import AsyncDriver
from neo4j.exceptions import AuthError, ClientError, DatabaseError, Neo4jError

from neopool import _fork
from neopool.config import SURROGATE_FIX, Neo4jConnectionConfig, utf8_problem
from neopool.errors import InvalidName, MissingDatabase, PrepareTimeout

logger = logging.getLogger("neopool")

DEFAULT_WORKSPACE = "base"
SYSTEM_DATABASE = "system"
_DATABASE_NOT_FOUND = "Neo.ClientError.Database.DatabaseNotFound"

#: Characters of a name that logs and errors show; the rest is only counted.
SHOWN_CHARACTERS = 60

#: Where and what was prepared: (uri, user, wanted database, workspace, schema).
CacheKey = tuple[str, str, str, str, "Schema | None"]


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


@dataclass(frozen=True)
class Schema:
    """What ``prepare_database`` creates in the database: one index on one label's key.

    ``kind`` is ``"constraint"`` (a uniqueness constraint, which indexes the
    key too; an existing plain index on it is replaced where the server insists
    and the data allows) or ``"index"`` (a plain index; nothing is ever
    dropped). ``label`` ``None`` means the workspace's name, LightRAG's rule.
    ``schema=None`` in ``prepare_database`` creates nothing.
    """

    kind: Literal["constraint", "index"]
    label: str | None = None
    key: str = "entity_id"

    def __post_init__(self) -> None:
        if self.kind not in ("constraint", "index"):
            raise ValueError(
                f"Schema kind {self.kind!r} is not one neopool knows; use Schema.unique(...) "
                f"or Schema.index(...), or schema=None for nothing"
            )
        for what, name in (("label", self.label), ("key", self.key)):
            if name is not None and not name.strip():
                raise InvalidName(f"Schema {what} is empty; give a name, e.g. {what}='base'")
            if name is not None:
                checked_name(name, f"schema {what}")

    @classmethod
    def unique(cls, label: str | None = None, key: str = "entity_id") -> Schema:
        """``key`` unique on ``label`` (default: the workspace's label)."""
        return cls("constraint", label, key)

    @classmethod
    def index(cls, label: str | None = None, key: str = "entity_id") -> Schema:
        """A plain index on ``label``'s ``key``; never drops or adds a constraint."""
        return cls("index", label, key)

    def label_for(self, workspace: str) -> str:
        """The label this schema indexes, for ``workspace``."""
        return self.label if self.label is not None else workspace

    def describe(self, workspace: str) -> str:
        """``uniqueness constraint on :`base`(`entity_id`)``, for logs."""
        what = "uniqueness constraint" if self.kind == "constraint" else "index"
        return f"{what} on :{_shown_label(self.label_for(workspace))}({_shown_label(self.key)})"


#: What ``prepare_database`` creates unless told otherwise: the design note's schema,
#: ``entity_id`` unique on the workspace's label (what LightRAG's storages rely on).
DEFAULT_SCHEMA = Schema.unique()


def _shown_label(name: str) -> str:
    if name.isprintable() and len(name) <= SHOWN_CHARACTERS:
        return quote_identifier(name)
    return shown(name)


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
        #: ``(database, label, key) -> whether key is unique there``, for constraints asked for.
        self.unique_keys: dict[tuple[str | None, str, str], bool] = {}

    async def prepare(
        self,
        driver: AsyncDriver,
        config: Neo4jConnectionConfig,
        workspace: str | None,
        database: str | None = None,
        schema: Schema | None = DEFAULT_SCHEMA,
    ) -> str | None:
        """The database to use for ``workspace``, with ``schema``; prepared on first call only.

        The database is ``NEO4J_DATABASE`` if set, else ``database`` if given,
        else a name derived from the workspace. Returns the database actually
        used, or ``None`` where the server's default database had to be used and
        its name could not be learned. Raises :class:`MissingDatabase` where
        that fallback is off, :class:`PrepareTimeout` after ``prepare_timeout``
        seconds, and :class:`InvalidName` (before any Cypher) for a name the
        server cannot be sent. ``schema=None`` creates nothing.
        """
        workspace = effective_workspace(config, workspace)
        if database is not None:
            checked_name(database, "database")
        target = config.database or database or database_name_for(workspace)
        key: CacheKey = (*config.server_key, target, workspace, schema)
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
                return await self._lead(key, mine, driver, target, workspace, schema, config)
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
        schema: Schema | None,
        config: Neo4jConnectionConfig,
    ) -> str | None:
        try:
            database = await asyncio.wait_for(
                self._prepare(driver, target, workspace, schema, config),
                mine.deadline - time.monotonic(),
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

    async def _prepare(
        self,
        driver: AsyncDriver,
        target: str,
        workspace: str,
        schema: Schema | None,
        config: Neo4jConnectionConfig,
    ) -> str | None:
        database = await self._open_or_create(driver, target, config.database_fallback)
        if schema is None:
            created = "no schema asked for"
        elif schema.kind == "constraint":
            created = await self._ensure_unique(driver, database, workspace, schema)
        else:
            created = await self._ensure_index(driver, database, workspace, schema)
        logger.info(
            "neopool: workspace %s prepared in database %s: %s",
            shown(workspace),
            shown(database),
            created,
        )
        return database

    async def _open_or_create(self, driver: AsyncDriver, target: str, fallback: bool) -> str | None:
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
            if not fallback:
                raise MissingDatabase(
                    f"database {shown(target)} does not exist and this server cannot create "
                    f"it ({exc.code}), and database_fallback is off "
                    f"(NEOPOOL_DATABASE_FALLBACK=false), so the default database is not used "
                    f"instead. Create the database, set NEO4J_DATABASE to one that exists, or "
                    f"allow the fallback (NEOPOOL_DATABASE_FALLBACK=true) if sharing the default "
                    f"database between workspaces is safe for your schema.",
                    target,
                ) from None
            logger.warning(
                "neopool: database %s does not exist and this server cannot create it (%s); "
                "using the default database. Set NEO4J_DATABASE to choose one, or "
                "NEOPOOL_DATABASE_FALLBACK=false to make this an error.",
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

    async def _ensure_unique(
        self, driver: AsyncDriver, database: str | None, workspace: str, schema: Schema
    ) -> str:
        """Make the key unique on the label; else index it and say why not. Returns what it did.

        The constraint comes first: its own index serves every lookup the plain
        one did, and on Neo4j a plain index on the same property would block it.
        A label that already has the plain index (LightRAG made it, or an older
        neopool) gets it replaced where the server insists, if the data has no
        duplicates: the caller asked for the constraint. Every outcome is final
        for this process (the preparation is cached); a duplicate-free later
        run fixes itself.
        """
        name, key = schema.label_for(workspace), schema.key
        label = quote_identifier(name)
        done = schema.describe(workspace)
        try:
            await self._run(driver, database, _unique_constraint(label, key))
            self.unique_keys[(database, name, key)] = True
            return done
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            refused: Neo4jError = exc
        if await self._has_unique_constraint(driver, database, name, key):
            # Another process created it at the same moment (or in another form).
            self.unique_keys[(database, name, key)] = True
            return done
        duplicates = await self._count_duplicates(driver, database, label, key)
        if (
            duplicates == (0, 0)
            and _blocked_by_plain_index(refused)
            and await self._replace_plain_index(driver, database, name, key)
        ):
            self.unique_keys[(database, name, key)] = True
            return f"{done} (replacing the plain index)"
        self.unique_keys[(database, name, key)] = False
        fallback = Schema.index(name, key)
        created = await self._ensure_index(driver, database, workspace, fallback)
        _warn_not_unique(name, key, database, duplicates, refused)
        return f"{created} (the uniqueness constraint was refused)"

    async def _has_unique_constraint(
        self, driver: AsyncDriver, database: str | None, label: str, key: str
    ) -> bool:
        try:
            rows = await self._run(driver, database, _UNIQUE_CONSTRAINTS, label=label, key=key)
        except AuthError:
            raise
        except (ClientError, DatabaseError):
            return False
        return bool(rows) and int(rows[0]["n"] or 0) > 0

    async def _count_duplicates(
        self, driver: AsyncDriver, database: str | None, label: str, key: str
    ) -> tuple[int, int] | None:
        """``(key values with more than one node, extra nodes)``; ``None`` if it cannot tell."""
        query = _DUPLICATES.format(label=label, key=quote_identifier(key))
        try:
            rows = await self._run(driver, database, query)
        except AuthError:
            raise
        except (ClientError, DatabaseError):
            return None
        if not rows:
            return (0, 0)
        return int(rows[0]["ids"] or 0), int(rows[0]["extra"] or 0)

    async def _replace_plain_index(
        self, driver: AsyncDriver, database: str | None, name: str, key: str
    ) -> bool:
        """Drop the plain index on the key that blocks the constraint, then add the constraint.

        If the constraint still fails (a duplicate written meanwhile), the
        plain index is put back by the caller: lookups are never left unindexed
        for longer than this takes.
        """
        try:
            rows = await self._run(driver, database, _PLAIN_INDEXES, label=name, key=key)
            for row in rows:
                await self._run(
                    driver, database, f"DROP INDEX {quote_identifier(row['name'])} IF EXISTS"
                )
            await self._run(driver, database, _unique_constraint(quote_identifier(name), key))
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            logger.info(
                "neopool: could not replace the index on :%s(%s) by a uniqueness constraint (%s)",
                _shown_label(name),
                _shown_label(key),
                exc.code,
            )
            return False
        logger.info(
            "neopool: replaced the index on :%s(%s) in database %s by a uniqueness constraint, "
            "as asked",
            _shown_label(name),
            _shown_label(key),
            shown(database),
        )
        return True

    async def _ensure_index(
        self, driver: AsyncDriver, database: str | None, workspace: str, schema: Schema
    ) -> str:
        """A plain index on the key, unless the key is indexed by a constraint already."""
        name, key = schema.label_for(workspace), schema.key
        query = (
            f"CREATE INDEX IF NOT EXISTS FOR (n:{quote_identifier(name)}) "
            f"ON (n.{quote_identifier(key)})"
        )
        try:
            await self._run(driver, database, query)
        except AuthError:
            raise
        except (ClientError, DatabaseError) as exc:
            if await self._has_unique_constraint(driver, database, name, key):
                return f"none: {Schema.unique(name, key).describe(workspace)} indexes it already"
            logger.warning(
                "neopool: could not create the %s: %s", schema.describe(workspace), exc.code
            )
            return f"none: the server refused the {schema.describe(workspace)}"
        return schema.describe(workspace)

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
        """A copy of the cache: ``(uri, user, wanted db, workspace, schema) -> db used``."""
        with self._lock:
            return dict(self._prepared)

    def clear(self) -> None:
        """Forget every prepared database (the next call prepares again)."""
        with self._lock:
            self._prepared.clear()
            self.unique_keys.clear()

    def after_fork_in_child(self) -> None:
        # Preparations running in the parent's threads will never finish here.
        self._lock = threading.Lock()
        self._running = {}


#: Key values with more than one node, and how many nodes are extra.
_DUPLICATES = (
    "MATCH (n:{label}) WHERE n.{key} IS NOT NULL "
    "WITH n.{key} AS id, count(*) AS copies WHERE copies > 1 "
    "RETURN count(id) AS ids, coalesce(sum(copies - 1), 0) AS extra"
)
#: Uniqueness constraints on a label's key (Neo4j 4.4 and 5 type names).
_UNIQUE_CONSTRAINTS = (
    "SHOW CONSTRAINTS YIELD type, labelsOrTypes, properties "
    "WHERE labelsOrTypes = [$label] AND properties = [$key] "
    "AND type IN ['UNIQUENESS', 'NODE_PROPERTY_UNIQUENESS'] RETURN count(*) AS n"
)
#: The plain (not constraint-owned) indexes on a label's key.
_PLAIN_INDEXES = (
    "SHOW INDEXES YIELD name, type, labelsOrTypes, properties, owningConstraint "
    "WHERE type = 'RANGE' AND labelsOrTypes = [$label] AND properties = [$key] "
    "AND owningConstraint IS NULL RETURN name"
)
_DUPLICATES_HINT = (
    "MATCH (n:{label}) WITH n.{key} AS id, count(*) AS copies WHERE copies > 1 RETURN id, copies"
)


def _unique_constraint(label: str, key: str) -> str:
    """The constraint statement; ``label`` quoted already, ``key`` quoted here."""
    return (
        f"CREATE CONSTRAINT IF NOT EXISTS FOR (n:{label}) "
        f"REQUIRE n.{quote_identifier(key)} IS UNIQUE"
    )


def _blocked_by_plain_index(error: Neo4jError) -> bool:
    """Whether the constraint was refused only because a plain index covers the property."""
    message = (error.message or "").lower()
    return error.code == "Neo.ClientError.Schema.IndexAlreadyExists" or (
        "index" in message and "constraint cannot be created" in message
    )


def _plain(name: str) -> str:
    """A name as it is, where it is short and printable; else as :func:`shown` shows it."""
    return name if name.isprintable() and len(name) <= SHOWN_CHARACTERS else shown(name)


def _warn_not_unique(
    name: str,
    key: str,
    database: str | None,
    duplicates: tuple[int, int] | None,
    refused: Neo4jError,
) -> None:
    """The one warning of a label whose key could not be made unique."""
    label = quote_identifier(name)
    writable = all(n.isprintable() and len(n) <= SHOWN_CHARACTERS for n in (name, key))
    if writable:
        constraint = _unique_constraint(label, key)
        listing = _DUPLICATES_HINT.format(label=label, key=quote_identifier(key))
    else:  # the statements would carry the names unquoted into the log: describe them
        constraint = "CREATE CONSTRAINT IF NOT EXISTS FOR (n:<label>) REQUIRE n.<key> IS UNIQUE"
        listing = _DUPLICATES_HINT.format(label="<label>", key="<key>")
    if duplicates is not None and duplicates[0]:
        ids, extra = duplicates
        logger.warning(
            "neopool: %s is not unique on label %s (database %s): %d %s value(s) have more "
            "than one node (%d extra node(s)), so the server refused a uniqueness constraint "
            "(%s). Kept a plain index; concurrent writers in several processes may create "
            "more duplicates. Fix: merge or delete the extra nodes (list them with: %s), then "
            "run: %s (or restart the workers: neopool adds it when it prepares the database).",
            _plain(key),
            _shown_label(name),
            shown(database),
            ids,
            _plain(key),
            extra,
            refused.code,
            listing,
            constraint,
        )
        return
    counted = "no duplicates found" if duplicates is not None else "duplicates not counted"
    logger.warning(
        "neopool: this server refused a uniqueness constraint on %s for label %s "
        "(database %s): %s (%s). Kept a plain index; concurrent writers in several "
        "processes may create duplicates. Fix: use a server that supports "
        "uniqueness constraints (Neo4j 5, ArcadeDB) with the CREATE CONSTRAINT privilege, "
        "then run: %s",
        _plain(key),
        _shown_label(name),
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
