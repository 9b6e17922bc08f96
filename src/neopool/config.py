"""Connection and pool settings, from arguments or the environment.

``Neo4jConnectionConfig()`` with no arguments reads the same ``NEO4J_*``
variables LightRAG reads, plus the ``NEOPOOL_*`` pool settings. Every value is
validated at construction, so a typo fails where it is made, not inside a task.
"""

from __future__ import annotations

import json
import os
import ssl
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

import neo4j
from neo4j import NotificationMinimumSeverity, TrustCustomCAs
from neo4j.auth_management import AsyncAuthManager, ClientCertificate
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from neopool._version import __version__
from neopool.credentials import CredentialsProvider, auth_manager
from neopool.errors import ConfigError

#: Seconds a close (a runner's loop, or every pool) may take when nothing gives a deadline.
DEFAULT_CLOSE_TIMEOUT = 10.0

#: URI schemes the official driver accepts.
DRIVER_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")
#: The routing-context key the driver fills in itself and refuses from the URI.
_RESERVED_ROUTING_KEY = "address"
#: Settings that never come from the environment (a function cannot be written there).
_NOT_FROM_ENVIRONMENT = frozenset({"credentials"})
#: Settings that take a list: from the environment, comma-separated or a JSON list.
_LIST_SETTINGS = frozenset({"trusted_certificates", "notifications_disabled_classifications"})
#: What the driver accepts for the notification settings (it checks neither itself).
SEVERITIES = tuple(member.value for member in NotificationMinimumSeverity)
#: The driver calls them classifications from 6.0, categories before. (5.22-5.28 have
#: classifications too, as a preview that warns when read: ``vars`` does not ask for it.)
_CLASSIFICATION_ENUM: Any = vars(neo4j).get("NotificationDisabledClassification")
_CLASSIFICATIONS_OPTION = (
    "notifications_disabled_classifications"
    if _CLASSIFICATION_ENUM is not None
    else "notifications_disabled_categories"
)
CLASSIFICATIONS = tuple(
    member.value for member in (_CLASSIFICATION_ENUM or neo4j.NotificationDisabledCategory)
)


def _env(name: str, default: Any = ..., **constraints: Any) -> Any:
    """A field that also reads environment variable ``name``."""
    return Field(default, validation_alias=name, **constraints)


class Neo4jConnectionConfig(BaseSettings):
    """Settings of the Neo4j driver of each event loop and of its lease pool.

    Precedence, highest first:

    * ``Neo4jConnectionConfig(**arguments)``: the arguments, then the
      environment, then neopool's defaults (an argument is final);
    * ``Neo4jConnectionConfig.from_env(**defaults)``: the environment, then the
      application's ``defaults``, then neopool's (deployment can change any
      of them).

    The password is a :class:`pydantic.SecretStr` and never appears in
    ``repr``, logs or stats.
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
    credentials: CredentialsProvider | None = Field(
        None,
        exclude=True,
        repr=False,
        description=(
            "A function (plain or async) returning the credentials to use now, instead of "
            "username/password: rotated passwords, expiring tokens (see Credential rotation)."
        ),
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
    user_agent: str = _env(
        "NEOPOOL_USER_AGENT",
        f"neopool/{__version__}",
        description="User agent each connection announces (servers log it).",
    )
    notifications_min_severity: str | None = _env(
        "NEOPOOL_NOTIFICATIONS_MIN_SEVERITY",
        None,
        description=(
            f"Least severe notification the server sends: {', '.join(SEVERITIES)}; "
            f"unset leaves it to the server."
        ),
    )
    notifications_disabled_classifications: tuple[str, ...] | None = _env(
        "NEOPOOL_NOTIFICATIONS_DISABLED_CLASSIFICATIONS",
        None,
        description=(
            f"Notification classifications the server does not send (comma-separated): "
            f"{', '.join(CLASSIFICATIONS)}."
        ),
    )

    # -- TLS -------------------------------------------------------------------
    trusted_certificates: tuple[str, ...] | None = _env(
        "NEOPOOL_TRUSTED_CERTIFICATES",
        None,
        description=(
            "PEM files of the CAs to trust (comma-separated), with bolt:// or neo4j://, which "
            "then encrypt; unset: bolt+s:// and neo4j+s:// trust the system CAs."
        ),
    )
    client_certificate: str | None = _env(
        "NEOPOOL_CLIENT_CERTIFICATE",
        None,
        description=(
            "PEM file of the client certificate for mutual TLS (with its key, unless "
            "client_key is set)."
        ),
    )
    client_key: str | None = _env(
        "NEOPOOL_CLIENT_KEY",
        None,
        description="PEM file of the client certificate's private key.",
    )
    client_key_password: SecretStr | None = _env(
        "NEOPOOL_CLIENT_KEY_PASSWORD",
        None,
        description="Password of an encrypted client key (never shown).",
    )

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
    blocked_loop_threshold: float | None = _env(
        "NEOPOOL_BLOCKED_LOOP_THRESHOLD",
        0.25,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Seconds the process loop may be blocked (a synchronous call in a coroutine) "
            "before a warning names the call; 0 or None turns the warning off."
        ),
    )

    # -- database preparation --------------------------------------------------
    prepare_timeout: float = _env(
        "NEOPOOL_PREPARE_TIMEOUT",
        60.0,
        gt=0,
        description="Seconds prepare_database may take, waiting for another caller included.",
    )
    database_fallback: bool = _env(
        "NEOPOOL_DATABASE_FALLBACK",
        True,
        description=(
            "Where the database cannot be created (Neo4j Community, ArcadeDB), use the "
            "server's default one, with a warning; false makes that an error (MissingDatabase), "
            "for schemas that separate tenants by database only."
        ),
    )

    def __init__(self, **values: Any) -> None:
        if values.get("credentials") is not None and (
            values.get("password") or values.get(env_name("password"))
        ):
            raise ConfigError(
                "invalid Neo4jConnectionConfig:\n  credentials: given together with a "
                "password; the provider supplies the password, so pass one or the other"
            )
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_env(cls, **defaults: Any) -> Neo4jConnectionConfig:
        """The environment's settings, with the application's ``defaults`` for the rest.

        Each ``NEO4J_*``/``NEOPOOL_*`` variable that is set wins over the
        default given here for its setting; ``defaults`` win over neopool's own.
        Use it in every process (web app, worker, script), so that one set of
        variables configures them all::

            Neo4jConnectionConfig.from_env(uri="bolt://localhost:7687", pool_max_size=20)

        A value the environment must not change goes to the constructor instead.
        """
        unknown = [name for name in defaults if not _field_for(name)]
        if unknown:
            known = ", ".join(cls.model_fields)
            raise ConfigError(
                f"invalid Neo4jConnectionConfig.from_env: {', '.join(sorted(unknown))} "
                f"is not a setting; known settings are: {known}"
            )
        environment = _Environment(cls)()
        values = {
            name: value
            for name, value in defaults.items()
            if env_name(_field_for(name)) not in environment
        }
        return cls(**values)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment (as :class:`_Environment` reads it)."""
        return (init_settings, _Environment(settings_cls), dotenv_settings, file_secret_settings)

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

    @field_validator(
        "username", "password", "database", "workspace", "user_agent", "client_key_password"
    )
    @classmethod
    def _check_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Bolt sends strings as UTF-8: a lone surrogate would fail deep inside the driver."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str):
            problem = utf8_problem(text)
            if problem is not None:
                if info.field_name in ("password", "client_key_password"):
                    problem = "contains a lone surrogate, which is not valid Unicode"
                raise ValueError(f"{problem}; {SURROGATE_FIX}")
        return value

    @field_validator("database", "workspace", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("credentials", mode="before")
    @classmethod
    def _check_credentials(cls, provider: Any) -> Any:
        if provider is None:
            return None
        is_manager = hasattr(provider, "get_auth") and hasattr(
            provider, "handle_security_exception"
        )
        if is_manager or not callable(provider):
            raise ValueError(
                f"takes a function returning credentials, not {type(provider).__name__}; "
                f"neopool makes one driver auth manager per event loop from it (a manager "
                f"cannot be shared between loops)"
            )
        return provider

    @field_validator("user_agent", mode="before")
    @classmethod
    def _default_user_agent(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return f"neopool/{__version__}"  # blank means the default, as for database
        return value

    @field_validator("user_agent")
    @classmethod
    def _check_user_agent(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("contains unprintable characters; use plain text, e.g. billing/1.2")
        return value

    @field_validator(*sorted(_LIST_SETTINGS), mode="before")
    @classmethod
    def _as_list(cls, value: Any, info: ValidationInfo) -> Any:
        """A list from a comma-separated string, a JSON list, or any iterable; empty is unset."""
        if value is None:
            return None
        if isinstance(value, os.PathLike):
            value = [value]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError:
                    variable = env_name(info.field_name or "")
                    raise ValueError(
                        f"starts with '[' but is no JSON list; write {variable}='a,b' "
                        f'or {variable}=\'["a", "b"]\''
                    ) from None
            else:
                value = text.split(",")
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]
            items = [getattr(item, "value", item) for item in items]  # driver enums
            items = [item.strip() if isinstance(item, str) else item for item in items]
            return tuple(item for item in items if item != "") or None
        return value

    @field_validator("notifications_min_severity", mode="before")
    @classmethod
    def _check_severity(cls, value: Any) -> Any:
        value = getattr(value, "value", value)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str) or value.strip().upper() not in SEVERITIES:
            raise ValueError(
                f"{_clip(str(value))!r} is not a severity the driver knows; use one of "
                f"{', '.join(SEVERITIES)} (OFF: no notifications at all)"
            )
        return value.strip().upper()

    @field_validator("notifications_disabled_classifications")
    @classmethod
    def _check_classifications(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        unknown = [item for item in value if item.upper() not in CLASSIFICATIONS]
        if unknown:
            raise ValueError(
                f"{', '.join(repr(_clip(item)) for item in unknown)} "
                f"{'is not a classification' if len(unknown) == 1 else 'are not classifications'} "
                f"the driver knows; use any of {', '.join(CLASSIFICATIONS)}"
            )
        return tuple(dict.fromkeys(item.upper() for item in value))

    @field_validator("client_certificate", "client_key", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("client_key_password", mode="before")
    @classmethod
    def _blank_password_is_unset(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if text == "" else value

    @field_validator("trusted_certificates")
    @classmethod
    def _check_trusted_certificates(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        paths = tuple(_readable_file(path) for path in value)
        for path in paths:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
            except ssl.SSLError:
                raise ValueError(
                    f"{path!r} holds no PEM certificate; give the CA certificate(s) as PEM "
                    f"(text starting -----BEGIN CERTIFICATE-----; convert DER with "
                    f"'openssl x509 -inform der -in ca.der -out ca.pem')"
                ) from None
        return paths

    @field_validator("client_certificate", "client_key")
    @classmethod
    def _check_client_file(cls, value: str | None) -> str | None:
        return None if value is None else _readable_file(value)

    @model_validator(mode="after")
    def _check_tls(self) -> Neo4jConnectionConfig:
        scheme = urlsplit(self.uri).scheme
        if self.trusted_certificates and "+" in scheme:
            plain = scheme.partition("+")[0]
            what = (
                "trusts the system CAs only"
                if scheme.endswith("+s")
                else "accepts any certificate unverified"
            )
            raise ValueError(
                f"trusted_certificates (NEOPOOL_TRUSTED_CERTIFICATES) cannot be used with "
                f"{scheme}://, which {what}: the driver refuses both together. To verify the "
                f"server against these CA files, write the URI as {plain}:// (neopool then "
                f"encrypts); to trust the system CAs, unset trusted_certificates"
            )
        if self.client_key_password is not None and self.client_certificate is None:
            raise ValueError(
                "client_key_password (NEOPOOL_CLIENT_KEY_PASSWORD) is set but there is no "
                "client certificate to use it with; set client_certificate "
                "(NEOPOOL_CLIENT_CERTIFICATE) and client_key (NEOPOOL_CLIENT_KEY), or unset it"
            )
        if self.client_key is not None and self.client_certificate is None:
            raise ValueError(
                "client_key (NEOPOOL_CLIENT_KEY) is set without client_certificate "
                "(NEOPOOL_CLIENT_CERTIFICATE); set the certificate the key belongs to, or "
                "unset the key"
            )
        if self.client_certificate is not None:
            if "+" not in scheme and not self.trusted_certificates:
                raise ValueError(
                    f"client_certificate (NEOPOOL_CLIENT_CERTIFICATE) needs an encrypted "
                    f"connection, but {scheme}:// without trusted_certificates is plain text "
                    f"(the driver would not send it); use {scheme}+s:// (system CAs), or set "
                    f"trusted_certificates (NEOPOOL_TRUSTED_CERTIFICATES) to your CA"
                )
            _check_client_pair(self.client_certificate, self.client_key, self.client_key_password)
        return self

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
        """Keyword arguments for ``AsyncGraphDatabase.driver`` (besides uri and auth).

        ``trusted_certificates`` with ``bolt://`` or ``neo4j://`` gives
        ``encrypted=True`` and ``TrustCustomCAs``; the ``+s``/``+ssc`` schemes
        set encryption themselves. A client key's password is passed as a
        function, so it shows in no ``repr`` of the options.
        """
        options: dict[str, Any] = {
            "max_connection_pool_size": self.max_connection_pool_size,
            "connection_timeout": self.connection_timeout,
            "connection_acquisition_timeout": self.connection_acquisition_timeout,
            "max_transaction_retry_time": self.max_transaction_retry_time,
            "max_connection_lifetime": self.max_connection_lifetime,
            "liveness_check_timeout": self.liveness_check_timeout,
            "keep_alive": self.keep_alive,
            "user_agent": self.user_agent,
        }
        if self.notifications_min_severity is not None:
            options["notifications_min_severity"] = self.notifications_min_severity
        if self.notifications_disabled_classifications is not None:
            options[_CLASSIFICATIONS_OPTION] = list(self.notifications_disabled_classifications)
        if self.trusted_certificates:
            options["encrypted"] = True
            options["trusted_certificates"] = TrustCustomCAs(*self.trusted_certificates)
        if self.client_certificate is not None:
            password = self.client_key_password
            options["client_certificate"] = ClientCertificate(
                self.client_certificate,
                self.client_key,
                password.get_secret_value if password is not None else None,
            )
        return options

    def auth(self) -> tuple[str, str]:
        """The ``(username, password)`` pair: the static credentials.

        A config with a ``credentials`` provider has none; build the driver
        with :meth:`driver_auth` instead (neopool's drivers do).
        """
        if self.credentials is not None:
            raise ConfigError(
                "this config takes its credentials from a provider (credentials=...), so it "
                "has no static (username, password); pass auth=config.driver_auth() to the "
                "driver: a new auth manager per driver"
            )
        return (self.username, self.password.get_secret_value())

    def driver_auth(self) -> tuple[str, str] | AsyncAuthManager:
        """What to pass as ``auth=`` to a new driver: call it once per driver.

        The static ``(username, password)``, or, with a ``credentials``
        provider, a new auth manager of the driver's own (managers belong to
        the event loop of the driver that uses them, so none is shared), whose
        wait for the provider is bounded by ``connection_acquisition_timeout``.
        """
        if self.credentials is not None:
            return auth_manager(self.credentials, self.connection_acquisition_timeout)
        return self.auth()

    @property
    def server_key(self) -> tuple[str, str]:
        """What identifies the server and account, for caches that must not mix them."""
        return (self.uri, self.username)


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (``""`` for one the environment cannot set)."""
    if field in _NOT_FROM_ENVIRONMENT:
        return ""
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


class _Environment(EnvSettingsSource):
    """The environment, as the config reads it.

    ``credentials`` is never read from it, and list settings arrive as the text
    they are (comma-separated or a JSON list, split by the field's validator)
    instead of being required to be JSON.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _NOT_FROM_ENVIRONMENT:
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if field_name in _LIST_SETTINGS:
            return value
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def _readable_file(path: str) -> str:
    """``path`` made absolute (``~`` expanded), once it is known to be a readable file.

    Absolute, because the driver reads it only when it first connects, perhaps
    after the worker changed directory; symbolic links are kept, so a
    certificate rotated by swapping a link (as Kubernetes does) is picked up.
    """
    if not path.strip() or "\x00" in path:
        raise ValueError("is an empty file name" if not path.strip() else "contains a NUL byte")
    absolute = os.path.abspath(os.path.expanduser(path))
    try:
        with open(absolute, "rb"):
            pass
    except FileNotFoundError:
        raise ValueError(f"file {absolute!r} does not exist; give the path of a PEM file") from None
    except IsADirectoryError:
        raise ValueError(f"{absolute!r} is a directory; give the path of a PEM file") from None
    except OSError as exc:
        raise ValueError(
            f"file {absolute!r} cannot be read ({exc.strerror or type(exc).__name__}); "
            f"make it readable by the user the workers run as"
        ) from None
    return absolute


class _NoPassword(Exception):
    """OpenSSL asked for a key password that was not given (instead of prompting on a tty)."""


def _no_password() -> str:
    raise _NoPassword


def _check_client_pair(certificate: str, key: str | None, password: SecretStr | None) -> None:
    """Load the client certificate and key as the driver will, so a bad pair fails now."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certificate)
    except ssl.SSLError:
        raise ValueError(
            f"client_certificate (NEOPOOL_CLIENT_CERTIFICATE): {certificate!r} holds no PEM "
            f"certificate; give the client certificate as PEM"
        ) from None
    secret = password.get_secret_value if password is not None else _no_password
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certificate, key, secret)
    except _NoPassword:
        raise ValueError(
            "client_key (NEOPOOL_CLIENT_KEY) is encrypted; set client_key_password "
            "(NEOPOOL_CLIENT_KEY_PASSWORD)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "the private key does not belong to the certificate; give the matching key"
        elif key is None:
            problem = (
                f"{certificate!r} holds no private key; set client_key (NEOPOOL_CLIENT_KEY) "
                f"to the key's PEM file"
            )
        elif password is not None:
            problem = (
                "the private key cannot be loaded: it is not a PEM private key, or "
                "client_key_password (NEOPOOL_CLIENT_KEY_PASSWORD) is wrong"
            )
        else:
            problem = f"{key!r} holds no PEM private key; give the key as PEM"
        raise ValueError(
            f"client_certificate (NEOPOOL_CLIENT_CERTIFICATE) / client_key "
            f"(NEOPOOL_CLIENT_KEY): {problem}"
        ) from None


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
        where = f"{field} ({env_name(field)})" if env_name(field) else field or loc[0]
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
