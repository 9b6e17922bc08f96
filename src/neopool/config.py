"""Connection and pool settings, from arguments or the environment.

``Neo4jConnectionConfig()`` with no arguments reads the same ``NEO4J_*``
variables LightRAG reads, plus the ``NEOPOOL_*`` pool settings. Every value is
validated at construction, so a typo fails where it is made, not inside a task.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from neopool.errors import ConfigError

#: URI schemes the official driver accepts.
DRIVER_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")


def _env(name: str, default: Any = ..., **constraints: Any) -> Any:
    """A field that also reads environment variable ``name``."""
    return Field(default, validation_alias=name, **constraints)


class Neo4jConnectionConfig(BaseSettings):
    """Settings of the Neo4j driver of each event loop and of its lease pool.

    Explicit arguments win over environment variables; anything not passed is
    read from the environment, then falls back to the default. The password is
    a :class:`pydantic.SecretStr` and never appears in ``repr``, logs or stats.
    """

    model_config = SettingsConfigDict(
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    # -- where and who ---------------------------------------------------------
    uri: str = _env("NEO4J_URI", description="Server URI, e.g. neo4j://localhost:7687.")
    username: str = _env("NEO4J_USERNAME", "neo4j", description="User name.")
    password: SecretStr = _env("NEO4J_PASSWORD", SecretStr(""), description="Password.")
    database: str | None = _env(
        "NEO4J_DATABASE",
        None,
        description="Database for every workspace; unset derives one from the workspace.",
    )
    workspace: str | None = _env(
        "NEO4J_WORKSPACE",
        None,
        description="Workspace that overrides the one passed to prepare_database.",
    )

    # -- the driver of each loop -----------------------------------------------
    max_connection_pool_size: int = _env(
        "NEO4J_MAX_CONNECTION_POOL_SIZE", 100, ge=1, description="Sockets per loop driver."
    )
    connection_timeout: float = _env(
        "NEO4J_CONNECTION_TIMEOUT", 30.0, gt=0, description="Seconds to open a socket."
    )
    connection_acquisition_timeout: float = _env(
        "NEO4J_CONNECTION_ACQUISITION_TIMEOUT",
        30.0,
        gt=0,
        description="Seconds a session waits for a socket of the driver.",
    )
    max_transaction_retry_time: float = _env(
        "NEO4J_MAX_TRANSACTION_RETRY_TIME",
        30.0,
        ge=0,
        description="Seconds managed transactions are retried.",
    )
    max_connection_lifetime: float = _env(
        "NEO4J_MAX_CONNECTION_LIFETIME",
        300.0,
        gt=0,
        description="Seconds before a socket is replaced.",
    )
    liveness_check_timeout: float | None = _env(
        "NEO4J_LIVENESS_CHECK_TIMEOUT",
        30.0,
        ge=0,
        description="Idle seconds after which a socket is checked before reuse.",
    )
    keep_alive: bool = _env("NEO4J_KEEP_ALIVE", True, description="TCP keep-alive.")

    # -- the lease pool of each loop -------------------------------------------
    pool_max_size: int = _env(
        "NEOPOOL_POOL_MAX_SIZE", 10, ge=1, description="Concurrent borrows per event loop."
    )
    pool_min_size: int = _env(
        "NEOPOOL_POOL_MIN_SIZE", 2, ge=0, description="Leases and sockets kept warm per loop."
    )
    borrow_timeout: float = _env(
        "NEOPOOL_BORROW_TIMEOUT", 30.0, gt=0, description="Seconds a borrower waits."
    )
    close_timeout: float = _env(
        "NEOPOOL_CLOSE_TIMEOUT",
        5.0,
        ge=0,
        description="Seconds close waits for leases to come back and the driver to close.",
    )
    utilisation_warning: float = _env(
        "NEOPOOL_UTILISATION_WARNING",
        0.8,
        gt=0,
        le=1,
        description="In-use fraction of pool_max_size above which a warning is logged.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    # -- validation --------------------------------------------------------------
    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        uri = uri.strip()
        if not uri:
            raise ValueError("is empty")
        parts = urlsplit(uri)
        if parts.scheme not in DRIVER_SCHEMES:
            raise ValueError(
                f"scheme {parts.scheme or '(none)'!r} is not one the Neo4j driver knows; "
                f"use one of {', '.join(s + '://' for s in DRIVER_SCHEMES)}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not carry credentials; pass username/password "
                "(NEO4J_USERNAME/NEO4J_PASSWORD) instead"
            )
        if not parts.hostname:
            raise ValueError("has no host; write it as scheme://host:port")
        return uri

    @field_validator("database", "workspace", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> Neo4jConnectionConfig:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) exceeds pool_max_size "
                f"({self.pool_max_size}); lower NEOPOOL_POOL_MIN_SIZE or raise "
                f"NEOPOOL_POOL_MAX_SIZE"
            )
        if self.pool_min_size > self.max_connection_pool_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) exceeds max_connection_pool_size "
                f"({self.max_connection_pool_size}); the driver cannot keep that many "
                f"sockets warm"
            )
        return self

    # -- use ---------------------------------------------------------------------
    def driver_options(self) -> dict[str, Any]:
        """Keyword arguments for ``AsyncGraphDatabase.driver`` (besides uri and auth)."""
        return {
            "max_connection_pool_size": self.max_connection_pool_size,
            "connection_timeout": self.connection_timeout,
            "connection_acquisition_timeout": self.connection_acquisition_timeout,
            "max_transaction_retry_time": self.max_transaction_retry_time,
            "max_connection_lifetime": self.max_connection_lifetime,
            "liveness_check_timeout": self.liveness_check_timeout,
            "keep_alive": self.keep_alive,
        }

    def auth(self) -> tuple[str, str]:
        """The ``(username, password)`` pair for the driver."""
        return (self.username, self.password.get_secret_value())

    @property
    def server_key(self) -> tuple[str, str]:
        """What identifies the server and account, for caches that must not mix them."""
        return (self.uri, self.username)


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    info = Neo4jConnectionConfig.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else field.upper()


def _describe(exc: ValidationError) -> str:
    """One line per problem: the field, its variable, what is wrong, the fix."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = error["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"  {message}")
            continue
        field = _field_for(loc[0])
        where = f"{field} ({env_name(field)})" if field else loc[0]
        if error["type"] == "missing":
            message = f"is required: pass {field}=... or set {env_name(field)}"
        elif error["type"] == "extra_forbidden":
            known = ", ".join(Neo4jConnectionConfig.model_fields)
            message = f"is not a setting; known settings are: {known}"
        lines.append(f"  {where}: {message}")
    return "invalid Neo4jConnectionConfig:\n" + "\n".join(lines)


def _field_for(name: str) -> str:
    fields = Neo4jConnectionConfig.model_fields
    if name in fields:
        return name
    for field, info in fields.items():
        if isinstance(info.validation_alias, str) and info.validation_alias.lower() == name.lower():
            return field
    return ""
