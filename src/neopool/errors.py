"""Every error neopool raises derives from :class:`NeopoolError`.

Errors from the Neo4j driver itself (``AuthError``, ``ServiceUnavailable``...)
are passed through unchanged, so code that already handles them keeps working.
"""

from __future__ import annotations


class NeopoolError(Exception):
    """Base class of every error raised by neopool."""


class ConfigError(NeopoolError, ValueError):
    """A configuration value is missing or invalid.

    Raised when :class:`~neopool.Neo4jConnectionConfig` is constructed, never
    later inside a task. The message names each bad field, the environment
    variable that sets it, and how to fix it. Passwords are never included.
    """


class PoolTimeout(NeopoolError, TimeoutError):
    """No lease became free before the borrow deadline."""

    def __init__(self, loop_id: str, max_size: int, waiting: int, timeout: float) -> None:
        self.loop_id = loop_id
        self.max_size = max_size
        self.waiting = waiting
        self.timeout = timeout
        super().__init__(
            f"no connection became free within {timeout:g}s on the pool of event loop "
            f"{loop_id}: all {max_size} leases (pool_max_size) were in use and "
            f"{waiting} borrower(s) were waiting. Return connections sooner, raise "
            f"pool_max_size (NEOPOOL_POOL_MAX_SIZE) or borrow_timeout "
            f"(NEOPOOL_BORROW_TIMEOUT)."
        )


class PrepareTimeout(NeopoolError, TimeoutError):
    """``prepare_database`` did not finish within ``prepare_timeout``.

    Raised to the caller running the preparation and to callers waiting for
    another one; nothing is cached, so a later call prepares again.
    """

    def __init__(self, message: str, workspace: str, timeout: float) -> None:
        self.workspace = workspace
        self.timeout = timeout
        super().__init__(message)

    def __reduce__(self) -> tuple[type[PrepareTimeout], tuple[str, str, float]]:
        return (type(self), (str(self), self.workspace, self.timeout))


class InvalidName(NeopoolError, ValueError):
    """A workspace or database name cannot be sent to the server.

    Raised by ``prepare_database`` before any Cypher runs, for example for a
    name with lone surrogates (bytes that were not UTF-8, decoded with
    ``surrogateescape``).
    """


class PoolClosed(NeopoolError):
    """The pool was closed; it hands out no more leases."""


class LeaseError(NeopoolError, RuntimeError):
    """A lease was used the wrong way.

    Returned twice, returned to a pool it does not belong to, used after it was
    returned, or used from an event loop other than the one that borrowed it.
    """


class UnsafeStatsDir(NeopoolError, OSError):
    """The stats directory is not the private one neopool created: nothing is done in it.

    Raised by the Celery integration, which publishes each prefork child's
    stats in a directory of its own making and never trusts one it did not make.
    """


class NoRunningLoop(NeopoolError, RuntimeError):
    """An async entry point was called where no event loop is running."""


class CredentialsTimeout(NeopoolError, TimeoutError):
    """The credentials provider did not answer within the bound of a logon.

    The bound is the config's ``connection_acquisition_timeout``. The provider
    call itself goes on in its daemon thread; the next logon waits for that
    same call again rather than starting another.
    """

    def __init__(self, provider: str, timeout: float) -> None:
        self.provider = provider
        self.timeout = timeout
        super().__init__(
            f"the credentials provider {provider} did not answer within {timeout:g}s, so a "
            f"connection could not log on. Make the provider answer sooner (give its own "
            f"requests a timeout, cache what it fetched) or raise "
            f"connection_acquisition_timeout (NEO4J_CONNECTION_ACQUISITION_TIMEOUT)."
        )

    def __reduce__(self) -> tuple[type[CredentialsTimeout], tuple[str, float]]:
        return (type(self), (self.provider, self.timeout))


class MissingDatabase(NeopoolError, LookupError):
    """The database to use does not exist and cannot be created, and falling back is off.

    Raised by ``prepare_database`` where ``database_fallback`` is ``False``
    (``NEOPOOL_DATABASE_FALLBACK=false``) instead of using the server's default
    database, which would put every workspace in one database. Nothing is
    written anywhere, and nothing is cached: a later call tries again.
    """

    def __init__(self, message: str, database: str) -> None:
        self.database = database
        super().__init__(message)

    def __reduce__(self) -> tuple[type[MissingDatabase], tuple[str, str]]:
        return (type(self), (str(self), self.database))


class LoopAlreadyRunning(NeopoolError, RuntimeError):
    """``neopool.run()`` was called where an event loop is already running."""


class CallCancelled(NeopoolError, RuntimeError):
    """A ``neopool.run()`` call was cancelled from outside: by ``cancel_calls()``
    (a Celery warm shutdown whose deadline passed) or because its loop closed or was
    stopped. The message says which."""
