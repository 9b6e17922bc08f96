"""Connection and pool settings, from arguments or the environment.

``Neo4jConnectionConfig()`` with no arguments reads the same ``NEO4J_*``
variables LightRAG reads, plus the ``NEOPOOL_*`` pool settings. Every value is
validated at construction, so a typo fails where it is made, not inside a task.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from neopool.errors import ConfigError

#: URI schemes the official driver accepts.
DRIVER_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")
#: The routing-context key the driver fills in itself and refuses from the URI.
_RESERVED_ROUTING_KEY = "address"


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
        description=(
            "Seconds a pool's close may take in all (leases coming back, then the driver "
            "closing); past that its sockets are released."
        ),
    )
    utilisation_warning: float = _env(
        "NEOPOOL_UTILISATION_WARNING",
        0.8,
        gt=0,
        le=1,
        description="In-use fraction of pool_max_size above which a warning is logged.",
    )

    # -- database preparation --------------------------------------------------
    prepare_timeout: float = _env(
        "NEOPOOL_PREPARE_TIMEOUT",
        60.0,
        gt=0,
        description="Seconds prepare_database may take, waiting for another caller included.",
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
        if any(char.isspace() or not char.isprintable() for char in uri):
            raise ValueError(
                "contains whitespace or unprintable characters; write it as scheme://host:port"
            )
        try:
            parts = urlsplit(uri)
        except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
            raise ValueError(f"cannot be parsed ({exc}); write it as scheme://host:port") from None
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
            raise ValueError(
                "has no host; write it as scheme://host:port (an IPv6 address in brackets)"
            )
        _check_port(parts.netloc)
        if parts.path not in ("", "/"):
            raise ValueError(
                f"has a path ({_clip(parts.path)!r}), which the driver ignores; remove it "
                f"(to choose a database, set database / NEO4J_DATABASE)"
            )
        if parts.fragment:
            raise ValueError("has a fragment ('#...'), which the driver ignores; remove it")
        _check_routing_context(parts)
        return uri

    @field_validator("username", "password", "database", "workspace")
    @classmethod
    def _check_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Bolt sends strings as UTF-8: a lone surrogate would fail deep inside the driver."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str):
            problem = utf8_problem(text)
            if problem is not None:
                if info.field_name == "password":
                    problem = "contains a lone surrogate, which is not valid Unicode"
                raise ValueError(f"{problem}; {SURROGATE_FIX}")
        return value

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
        if self.pool_max_size > self.max_connection_pool_size:
            default = "" if "pool_max_size" in self.model_fields_set else ", the default"
            raise ValueError(
                f"pool_max_size ({self.pool_max_size}{default}) exceeds "
                f"max_connection_pool_size ({self.max_connection_pool_size}): borrowers "
                f"beyond {self.max_connection_pool_size} would get a lease, then time out "
                f"waiting for a socket of the driver; lower NEOPOOL_POOL_MAX_SIZE or raise "
                f"NEO4J_MAX_CONNECTION_POOL_SIZE"
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


#: How to fix a string with lone surrogates; shared with the checks of workspace names.
SURROGATE_FIX = (
    "pass valid Unicode (lone surrogates come from bytes that were not UTF-8, "
    "e.g. an environment variable or file name decoded with surrogateescape)"
)


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be sent to the server (Bolt strings are UTF-8), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate (U+{ord(text[exc.start]):04X} at index {exc.start}), "
            f"which is not valid Unicode"
        )
    return None


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_port(netloc: str) -> None:
    """The port as the driver reads it: empty (7687) or a number from 1 to 65535.

    The driver keeps a port it cannot read as text (the first connect fails)
    and silently replaces port 0 with 7687, so both are refused here.
    """
    if netloc.startswith("["):
        _, _, rest = netloc.rpartition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(
                f"has {_clip(rest)!r} after the IPv6 address; write it as scheme://[address]:port"
            )
        port = rest[1:]
    else:
        port = netloc.partition(":")[2]
    if not port:
        return
    if not (port.isascii() and port.isdigit()):
        raise ValueError(
            f"port {_clip(port)!r} is not a number; write it as scheme://host:port "
            f"with a port from 1 to 65535 (Neo4j listens on 7687)"
        )
    if not 1 <= int(port) <= 65535:
        raise ValueError(
            f"port {int(port)} is out of range; use a port from 1 to 65535 (Neo4j listens on 7687)"
        )


def _check_routing_context(parts: SplitResult) -> None:
    """A query is a routing context: neo4j:// takes one, bolt:// does not."""
    if not parts.query:
        return
    if parts.scheme.startswith("bolt"):
        raise ValueError(
            f"has a query ('?...'), but {parts.scheme}:// connects to one server and "
            f"takes no routing context; remove it, or use neo4j:// for a routing context"
        )
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if not key:
            raise ValueError("has a routing context entry without a key; write ?key=value")
        if key in seen:
            raise ValueError(f"gives routing context key {_clip(key)!r} twice; give it once")
        if not value:
            raise ValueError(f"gives routing context key {_clip(key)!r} no value; write ?key=value")
        if key == _RESERVED_ROUTING_KEY:
            raise ValueError(
                f"gives routing context key {key!r}, which the driver sets itself; remove it"
            )
        seen.add(key)


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
