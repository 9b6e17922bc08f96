"""TLS, identification, notification and credential settings, checked at construction.

Every setting the driver would only reject at the first connection (or would
send to the server to reject) is a ConfigError when the config is built,
naming the field, its environment variable and the fix. The PEM files are
real ones, from a throwaway CA (trustme).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import neo4j
import pytest
from neo4j import (
    AsyncGraphDatabase,
    NotificationMinimumSeverity,
    TrustCustomCAs,
    basic_auth,
)
from neo4j.auth_management import AsyncAuthManager, AsyncAuthManagers, ClientCertificate
from neo4j.exceptions import ConfigurationError

import neopool
from neopool import ConfigError, Neo4jConnectionConfig
from neopool.credentials import ProviderAuthManager
from neopool.testing import TlsCertificates

SECRET = "hunter2-very-secret"
KEY_PASSWORD = "key-pass-very-secret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("NEO4J_", "NEOPOOL_")) and not name.startswith("NEOPOOL_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def pki() -> Iterator[TlsCertificates]:
    pytest.importorskip("trustme")
    with TlsCertificates() as certificates:
        yield certificates


@pytest.fixture(scope="module")
def other_ca() -> Iterator[TlsCertificates]:
    with TlsCertificates() as certificates:
        yield certificates


def _error(**settings: object) -> str:
    settings.setdefault("uri", "bolt://h")
    if "credentials" not in settings:
        settings.setdefault("password", SECRET)
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(**settings)
    message = str(raised.value)
    assert SECRET not in message
    assert KEY_PASSWORD not in message
    return message


# -- trusted_certificates --------------------------------------------------------------------
def test_trusted_certificates_turn_bolt_encrypted_with_the_custom_cas(
    pki: TlsCertificates, other_ca: TlsCertificates
) -> None:
    config = Neo4jConnectionConfig(
        uri="bolt://db.example:7687", trusted_certificates=[pki.ca_path, str(other_ca.ca_path)]
    )
    assert config.trusted_certificates == (str(pki.ca_path), str(other_ca.ca_path))
    options = config.driver_options()
    assert options["encrypted"] is True
    assert isinstance(options["trusted_certificates"], TrustCustomCAs)
    assert options["trusted_certificates"].certs == config.trusted_certificates


def test_without_trusted_certificates_nothing_about_encryption_is_passed() -> None:
    for uri in ("bolt://h", "neo4j+s://h", "bolt+ssc://h"):
        options = Neo4jConnectionConfig(uri=uri).driver_options()
        assert not {"encrypted", "trusted_certificates", "client_certificate"} & set(options)


def test_trusted_certificates_from_the_environment_comma_separated_or_json(
    pki: TlsCertificates, other_ca: TlsCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEO4J_URI", "neo4j://h")
    both = (str(pki.ca_path), str(other_ca.ca_path))
    monkeypatch.setenv("NEOPOOL_TRUSTED_CERTIFICATES", f" {both[0]} , {both[1]} ")
    assert Neo4jConnectionConfig().trusted_certificates == both
    monkeypatch.setenv("NEOPOOL_TRUSTED_CERTIFICATES", f'["{both[0]}", "{both[1]}"]')
    assert Neo4jConnectionConfig().trusted_certificates == both
    monkeypatch.setenv("NEOPOOL_TRUSTED_CERTIFICATES", "  ")
    assert Neo4jConnectionConfig().trusted_certificates is None
    monkeypatch.setenv("NEOPOOL_TRUSTED_CERTIFICATES", f'["{both[0]}"')
    with pytest.raises(ConfigError, match="no JSON list"):
        Neo4jConnectionConfig()


def test_a_relative_ca_path_is_made_absolute_so_a_later_chdir_cannot_break_it(
    pki: TlsCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pki.directory)
    config = Neo4jConnectionConfig(uri="bolt://h", trusted_certificates="ca.pem")
    assert config.trusted_certificates == (str(pki.ca_path),)
    monkeypatch.setenv("HOME", str(pki.directory.parent))
    home = Neo4jConnectionConfig(
        uri="bolt://h", trusted_certificates=f"~/{pki.directory.name}/ca.pem"
    )
    assert home.trusted_certificates == (str(pki.ca_path),)


@pytest.mark.parametrize("scheme", ["bolt+s", "bolt+ssc", "neo4j+s", "neo4j+ssc"])
async def test_a_ca_file_with_a_secure_scheme_is_refused_as_the_driver_would(
    scheme: str, pki: TlsCertificates
) -> None:
    # The driver itself refuses trust settings with these schemes, but only when the
    # driver is built, which is inside a task for neopool: so the config says it first.
    with pytest.raises(ConfigurationError, match="trusted_certificates"):
        AsyncGraphDatabase.driver(
            f"{scheme}://h", trusted_certificates=TrustCustomCAs(str(pki.ca_path))
        )
    message = _error(uri=f"{scheme}://h", trusted_certificates=[pki.ca_path])
    assert "trusted_certificates (NEOPOOL_TRUSTED_CERTIFICATES)" in message
    assert f"cannot be used with {scheme}://" in message
    assert f"write the URI as {scheme.partition('+')[0]}://" in message
    assert "unset trusted_certificates" in message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d, pki: d / "missing.pem", "does not exist"),
        (lambda d, pki: d, "is a directory"),
        (lambda d, pki: _write(d / "empty.pem", b""), "holds no PEM certificate"),
        (lambda d, pki: _write(d / "notes.txt", b"not a certificate\n"), "no PEM certificate"),
        (lambda d, pki: pki.key_path, "holds no PEM certificate"),  # a key, not a certificate
        (
            lambda d, pki: _write(d / "ca.der", ssl.PEM_cert_to_DER_cert(pki.ca_path.read_text())),
            "convert DER",
        ),
    ],
    ids=["missing", "directory", "empty", "text", "private-key", "der"],
)
def test_a_ca_file_that_is_missing_or_not_pem_is_refused_at_construction(
    make: object, says: str, pki: TlsCertificates, tmp_path: Path
) -> None:
    path = make(tmp_path, pki)  # type: ignore[operator]
    message = _error(trusted_certificates=[pki.ca_path, path])
    assert "trusted_certificates (NEOPOOL_TRUSTED_CERTIFICATES)" in message
    assert says in message
    assert str(path) in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_ca_file_is_refused_at_construction(
    pki: TlsCertificates, tmp_path: Path
) -> None:
    path = _write(tmp_path / "ca.pem", pki.ca_path.read_bytes())
    path.chmod(0)
    assert "cannot be read" in _error(trusted_certificates=path)


# -- mutual TLS ------------------------------------------------------------------------------
def test_a_client_certificate_becomes_the_drivers_client_certificate(
    pki: TlsCertificates,
) -> None:
    cert, key = pki.client_certificate(key_password=KEY_PASSWORD)
    config = Neo4jConnectionConfig(
        uri="neo4j+s://h",
        client_certificate=cert,
        client_key=str(key),
        client_key_password=KEY_PASSWORD,
    )
    options = config.driver_options()
    client = options["client_certificate"]
    assert isinstance(client, ClientCertificate)
    assert (client.certfile, client.keyfile) == (str(cert), str(key))
    assert callable(client.password)
    assert client.password() == KEY_PASSWORD  # handed over as a function...
    for shown in (repr(config), str(config), str(config.model_dump()), repr(options)):
        assert KEY_PASSWORD not in shown  # ...so it shows nowhere


def test_mutual_tls_settings_from_the_environment(
    pki: TlsCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = pki.client_certificate(key_password=KEY_PASSWORD)
    monkeypatch.setenv("NEO4J_URI", "bolt://h")
    monkeypatch.setenv("NEOPOOL_TRUSTED_CERTIFICATES", str(pki.ca_path))
    monkeypatch.setenv("NEOPOOL_CLIENT_CERTIFICATE", str(cert))
    monkeypatch.setenv("NEOPOOL_CLIENT_KEY", str(key))
    monkeypatch.setenv("NEOPOOL_CLIENT_KEY_PASSWORD", KEY_PASSWORD)
    config = Neo4jConnectionConfig()
    assert config.client_certificate == str(cert)
    assert config.client_key == str(key)
    assert config.client_key_password is not None
    assert config.client_key_password.get_secret_value() == KEY_PASSWORD
    assert config.driver_options()["encrypted"] is True


def test_a_certificate_file_holding_its_key_needs_no_client_key(
    pki: TlsCertificates, tmp_path: Path
) -> None:
    cert, key = pki.client_certificate()
    both = _write(tmp_path / "both.pem", cert.read_bytes() + key.read_bytes())
    config = Neo4jConnectionConfig(uri="bolt+s://h", client_certificate=both)
    assert config.driver_options()["client_certificate"].keyfile is None


@pytest.mark.parametrize(
    "uri", ["bolt://h", "neo4j://h", "bolt+s://h", "bolt+ssc://h", "neo4j+s://h", "neo4j+ssc://h"]
)
async def test_every_tls_option_is_one_the_driver_takes(uri: str, pki: TlsCertificates) -> None:
    cert, key = pki.client_certificate(key_password=KEY_PASSWORD)
    settings: dict[str, object] = {
        "client_certificate": cert,
        "client_key": key,
        "client_key_password": KEY_PASSWORD,
        "user_agent": "billing/1.0",
        "notifications_min_severity": "warning",
        "notifications_disabled_classifications": ["hint", "deprecation"],
    }
    if "+" not in uri:
        settings["trusted_certificates"] = [pki.ca_path]
    config = Neo4jConnectionConfig(uri=uri, **settings)
    driver = AsyncGraphDatabase.driver(uri, auth=config.driver_auth(), **config.driver_options())
    assert driver.encrypted
    await driver.close()


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (
            lambda pki, d: {"client_key": pki.key_path},
            ["client_key (NEOPOOL_CLIENT_KEY) is set without client_certificate"],
        ),
        (
            lambda pki, d: {"client_key_password": KEY_PASSWORD},
            ["client_key_password (NEOPOOL_CLIENT_KEY_PASSWORD) is set but there is no"],
        ),
        (
            lambda pki, d: {"uri": "bolt://h", "client_certificate": pki.client_certificate()[0]},
            ["needs an encrypted connection", "bolt+s://", "trusted_certificates"],
        ),
        (
            lambda pki, d: dict(
                zip(
                    ("client_certificate", "client_key"),
                    pki.client_certificate(key_password=KEY_PASSWORD),
                    strict=True,
                )
            ),
            ["client_key (NEOPOOL_CLIENT_KEY) is encrypted", "set client_key_password"],
        ),
        (
            lambda pki, d: dict(
                zip(
                    ("client_certificate", "client_key"),
                    pki.client_certificate(key_password="another password"),
                    strict=True,
                ),
                client_key_password=KEY_PASSWORD,
            ),
            ["not a PEM private key, or client_key_password", "is wrong"],
        ),
        (
            lambda pki, d: {
                "client_certificate": pki.client_certificate()[0],
                "client_key": pki.client_certificate()[1],
            },
            ["does not belong to the certificate"],
        ),
        (
            lambda pki, d: {"client_certificate": pki.client_certificate()[0]},
            ["holds no private key", "set client_key"],
        ),
        (
            lambda pki, d: {
                "client_certificate": pki.client_certificate()[0],
                "client_key": _write(d / "key.pem", b"junk"),
            },
            ["holds no PEM private key"],
        ),
        (
            lambda pki, d: {
                "client_certificate": _write(d / "cert.pem", b"junk"),
                "client_key": pki.key_path,
            },
            ["client_certificate (NEOPOOL_CLIENT_CERTIFICATE)", "holds no PEM certificate"],
        ),
        (
            lambda pki, d: {"client_certificate": d / "nope.pem"},
            ["client_certificate (NEOPOOL_CLIENT_CERTIFICATE)", "does not exist"],
        ),
    ],
    ids=[
        "key-without-cert",
        "password-without-cert",
        "cert-without-tls",
        "encrypted-key-no-password",
        "wrong-password",
        "key-of-another-cert",
        "cert-without-key",
        "key-not-pem",
        "cert-not-pem",
        "cert-missing",
    ],
)
def test_a_client_certificate_the_driver_could_not_load_is_refused_at_construction(
    settings: object, says: list[str], pki: TlsCertificates, tmp_path: Path
) -> None:
    values = settings(pki, tmp_path)  # type: ignore[operator]
    values.setdefault("uri", "bolt+s://h")
    message = _error(**values)
    for text in says:
        assert text in message


# -- user agent and notifications --------------------------------------------------------------
def test_the_user_agent_defaults_to_neopool_and_its_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = f"neopool/{neopool.__version__}"
    assert Neo4jConnectionConfig(uri="bolt://h").user_agent == default
    assert Neo4jConnectionConfig(uri="bolt://h").driver_options()["user_agent"] == default
    assert Neo4jConnectionConfig(uri="bolt://h", user_agent=" ").user_agent == default
    monkeypatch.setenv("NEOPOOL_USER_AGENT", "billing-worker/2.1")
    assert Neo4jConnectionConfig(uri="bolt://h").driver_options()["user_agent"] == (
        "billing-worker/2.1"
    )
    assert "user_agent (NEOPOOL_USER_AGENT): contains unprintable" in _error(user_agent="a\nb")
    assert "surrogate" in _error(user_agent="a\udcff")


#: The driver's names: classifications from neo4j 6, categories in 5.x (where 5.22-5.28's
#: classifications are a preview that warns when read).
_DRIVER_HAS_CLASSIFICATIONS = "NotificationDisabledClassification" in vars(neo4j)
DISABLED_CLASSIFICATION = (
    vars(neo4j)["NotificationDisabledClassification"]
    if _DRIVER_HAS_CLASSIFICATIONS
    else neo4j.NotificationDisabledCategory
)
CLASSIFICATIONS_OPTION = (
    "notifications_disabled_classifications"
    if _DRIVER_HAS_CLASSIFICATIONS
    else "notifications_disabled_categories"
)


async def test_the_driver_takes_any_notification_setting_so_the_config_checks_them() -> None:
    # Nothing stops these at construction in the driver: the server would refuse them.
    driver = AsyncGraphDatabase.driver(
        "bolt://h",
        notifications_min_severity="LOUD",  # type: ignore[arg-type]
        **{CLASSIFICATIONS_OPTION: ["NOPE"]},  # type: ignore[arg-type]
    )
    await driver.close()
    message = _error(notifications_min_severity="LOUD")
    assert "notifications_min_severity (NEOPOOL_NOTIFICATIONS_MIN_SEVERITY)" in message
    assert "'LOUD' is not a severity" in message
    assert "OFF, WARNING, INFORMATION" in message
    message = _error(notifications_disabled_classifications=["hint", "NOPE", "perf"])
    assert "notifications_disabled_classifications (NEOPOOL_NOTIFICATIONS_DISABLED_" in message
    assert "'NOPE', 'perf' are not classifications the driver knows" in message
    assert "PERFORMANCE" in message


def test_notification_settings_are_normalised_for_the_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Neo4jConnectionConfig(
        uri="bolt://h",
        notifications_min_severity=NotificationMinimumSeverity.WARNING,
        notifications_disabled_classifications=[
            DISABLED_CLASSIFICATION.HINT,
            "deprecation",
            "HINT",
        ],
    )
    options = config.driver_options()
    assert options["notifications_min_severity"] == "WARNING"
    assert options[CLASSIFICATIONS_OPTION] == ["HINT", "DEPRECATION"]
    unset = Neo4jConnectionConfig(uri="bolt://h").driver_options()
    assert "notifications_min_severity" not in unset  # the server's own default
    assert CLASSIFICATIONS_OPTION not in unset
    monkeypatch.setenv("NEO4J_URI", "bolt://h")
    monkeypatch.setenv("NEOPOOL_NOTIFICATIONS_MIN_SEVERITY", "off")
    monkeypatch.setenv("NEOPOOL_NOTIFICATIONS_DISABLED_CLASSIFICATIONS", "security, topology")
    from_env = Neo4jConnectionConfig()
    assert from_env.notifications_min_severity == "OFF"
    assert from_env.notifications_disabled_classifications == ("SECURITY", "TOPOLOGY")


# -- credentials ---------------------------------------------------------------------------------
def _provider() -> tuple[str, str]:
    return ("neo4j", SECRET)


def test_a_credentials_provider_is_never_read_from_the_environment_nor_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDENTIALS", "os.system")
    monkeypatch.setenv("credentials", "x")
    assert Neo4jConnectionConfig(uri="bolt://h").credentials is None
    config = Neo4jConnectionConfig(uri="bolt://h", credentials=_provider)
    assert config.credentials is _provider
    assert "credentials" not in repr(config)
    assert "credentials" not in config.model_dump()
    assert "_provider" not in config.model_dump_json()


def test_a_credentials_provider_gives_every_driver_a_manager_of_its_own() -> None:
    config = Neo4jConnectionConfig(uri="bolt://h", credentials=_provider)
    first, second = config.driver_auth(), config.driver_auth()
    assert first is not second
    assert isinstance(first, AsyncAuthManager)  # the driver's interface
    assert isinstance(first, ProviderAuthManager)
    assert "_provider" in repr(first)
    assert SECRET not in repr(first)
    with pytest.raises(ConfigError, match="takes its credentials from a provider"):
        config.auth()
    static = Neo4jConnectionConfig(uri="bolt://h", password=SECRET)
    assert static.driver_auth() == static.auth() == ("neo4j", SECRET)


def test_a_drivers_own_manager_waits_for_the_provider_as_long_as_the_config_says() -> None:
    """Also for a driver the application opens itself with ``auth=config.driver_auth()``."""
    config = Neo4jConnectionConfig(
        uri="bolt://h", credentials=_provider, connection_acquisition_timeout=3.5
    )
    manager = config.driver_auth()
    assert isinstance(manager, ProviderAuthManager)
    assert manager.timeout == 3.5


async def _async_provider() -> object:
    return basic_auth("neo4j", SECRET)


def test_a_provider_wins_over_a_password_in_the_environment_but_not_over_one_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEO4J_PASSWORD", SECRET)
    Neo4jConnectionConfig(uri="bolt://h", credentials=_provider)
    message = _error(credentials=_provider, password=SECRET)
    assert "credentials: given together with a password" in message


@pytest.mark.parametrize(
    ("provider", "says"),
    [
        ("neo4j:secret", "takes a function returning credentials, not str"),
        (("neo4j", "secret"), "not tuple"),
        (AsyncAuthManagers.basic(_async_provider), "one driver auth manager per event loop"),
    ],
    ids=["string", "tuple", "auth-manager"],
)
def test_a_credentials_provider_that_is_no_function_is_refused(provider: object, says: str) -> None:
    message = _error(credentials=provider)
    assert "credentials: " in message
    assert "(CREDENTIALS)" not in message  # no environment variable sets it
    assert says in message
