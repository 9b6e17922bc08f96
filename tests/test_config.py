"""Neo4jConnectionConfig: explicit values or the environment, validated at construction."""

from __future__ import annotations

import logging
import warnings

import pytest
from neo4j import AsyncGraphDatabase

import neopool
from neopool import ConfigError, Neo4jConnectionConfig

SECRET = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(("NEO4J_", "NEOPOOL_")) and not name.startswith("NEOPOOL_TEST_"):
            monkeypatch.delenv(name)


def test_the_notes_example_builds_a_config() -> None:
    config = Neo4jConnectionConfig(
        uri="neo4j://localhost:7687",
        username="neo4j",
        password="password",
        max_connection_pool_size=50,
        pool_max_size=10,
        pool_min_size=2,
    )
    assert config.max_connection_pool_size == 50
    assert (config.pool_max_size, config.pool_min_size) == (10, 2)
    assert config.auth() == ("neo4j", "password")


def test_no_arguments_reads_every_lightrag_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "NEO4J_URI": "bolt://db.example:7687",
        "NEO4J_USERNAME": "reader",
        "NEO4J_PASSWORD": SECRET,
        "NEO4J_DATABASE": "graph",
        "NEO4J_WORKSPACE": "team-a",
        "NEO4J_MAX_CONNECTION_POOL_SIZE": "33",
        "NEO4J_CONNECTION_TIMEOUT": "4.5",
        "NEO4J_CONNECTION_ACQUISITION_TIMEOUT": "6",
        "NEO4J_MAX_TRANSACTION_RETRY_TIME": "7",
        "NEO4J_MAX_CONNECTION_LIFETIME": "120",
        "NEO4J_LIVENESS_CHECK_TIMEOUT": "9",
        "NEO4J_KEEP_ALIVE": "false",
        "NEOPOOL_POOL_MAX_SIZE": "12",
        "NEOPOOL_POOL_MIN_SIZE": "3",
        "NEOPOOL_BORROW_TIMEOUT": "2.5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Neo4jConnectionConfig()
    assert config.uri == "bolt://db.example:7687"
    assert config.auth() == ("reader", SECRET)
    assert (config.database, config.workspace) == ("graph", "team-a")
    assert config.driver_options() == {
        "max_connection_pool_size": 33,
        "connection_timeout": 4.5,
        "connection_acquisition_timeout": 6.0,
        "max_transaction_retry_time": 7.0,
        "max_connection_lifetime": 120.0,
        "liveness_check_timeout": 9.0,
        "keep_alive": False,
        "user_agent": f"neopool/{neopool.__version__}",
    }
    assert (config.pool_max_size, config.pool_min_size, config.borrow_timeout) == (12, 3, 2.5)


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://from-env:7687")
    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "4")
    config = Neo4jConnectionConfig(uri="neo4j://explicit:7687")
    assert config.uri == "neo4j://explicit:7687"
    assert config.pool_max_size == 4


def test_from_env_lets_the_environment_override_the_applications_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://from-env:7687")
    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "4")
    config = Neo4jConnectionConfig.from_env(
        uri="bolt://app-default:7687", pool_max_size=20, pool_min_size=1, username="app"
    )
    assert config.uri == "bolt://from-env:7687"  # the environment wins over the application
    assert config.pool_max_size == 4
    assert config.pool_min_size == 1  # the application's default, where no variable is set
    assert config.username == "app"
    assert config.borrow_timeout == 30.0  # neopool's default, where neither says


def test_from_env_without_the_environment_is_the_applications_defaults() -> None:
    config = Neo4jConnectionConfig.from_env(uri="bolt://localhost:7687", database_fallback=False)
    assert config.uri == "bolt://localhost:7687"
    assert config.database_fallback is False
    assert config == Neo4jConnectionConfig(uri="bolt://localhost:7687", database_fallback=False)


def test_from_env_refuses_a_default_that_is_not_a_setting() -> None:
    with pytest.raises(ConfigError, match="pool_max_sise is not a setting; known settings are"):
        Neo4jConnectionConfig.from_env(uri="bolt://h", pool_max_sise=3)


def test_from_env_checks_what_it_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOPOOL_POOL_MIN_SIZE", "50")
    with pytest.raises(ConfigError, match="pool_min_size \\(50\\) exceeds pool_max_size \\(20\\)"):
        Neo4jConnectionConfig.from_env(uri="bolt://h", pool_max_size=20)


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("0", False), ("true", True)])
def test_database_fallback_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    assert Neo4jConnectionConfig(uri="bolt://h").database_fallback is True  # today's behaviour
    monkeypatch.setenv("NEOPOOL_DATABASE_FALLBACK", value)
    assert Neo4jConnectionConfig(uri="bolt://h").database_fallback is expected


def test_blank_database_means_derive_it_from_the_workspace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEO4J_DATABASE", "  ")
    assert Neo4jConnectionConfig(uri="bolt://h").database is None


def test_defaults_match_lightrag_and_the_note() -> None:
    config = Neo4jConnectionConfig(uri="bolt://h")
    assert config.username == "neo4j"
    assert config.max_connection_pool_size == 100
    assert config.max_connection_lifetime == 300.0
    assert (config.pool_max_size, config.pool_min_size) == (10, 2)


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({}, ["uri (NEO4J_URI)", "is required", "set NEO4J_URI"]),
        ({"uri": ""}, ["uri (NEO4J_URI)", "is empty"]),
        ({"uri": "http://localhost:7474"}, ["uri (NEO4J_URI)", "'http'", "neo4j://"]),
        ({"uri": "localhost:7687"}, ["uri (NEO4J_URI)", "neo4j://"]),
        ({"uri": "bolt://"}, ["uri (NEO4J_URI)", "no host"]),
        ({"uri": "bolt://h", "pool_max_size": 0}, ["pool_max_size (NEOPOOL_POOL_MAX_SIZE)"]),
        (
            {"uri": "bolt://h", "pool_min_size": 5, "pool_max_size": 2},
            ["pool_min_size (5) exceeds pool_max_size (2)", "NEOPOOL_POOL_MIN_SIZE"],
        ),
        ({"uri": "bolt://h", "pool_min_size": -1}, ["pool_min_size (NEOPOOL_POOL_MIN_SIZE)"]),
        ({"uri": "bolt://h", "borrow_timeout": -1}, ["borrow_timeout (NEOPOOL_BORROW_TIMEOUT)"]),
        (
            {"uri": "bolt://h", "connection_timeout": -3},
            ["connection_timeout (NEO4J_CONNECTION_TIMEOUT)"],
        ),
        (
            {"uri": "bolt://h", "max_transaction_retry_time": -1},
            ["max_transaction_retry_time (NEO4J_MAX_TRANSACTION_RETRY_TIME)"],
        ),
        (
            {"uri": "bolt://h", "max_connection_pool_size": 0},
            ["max_connection_pool_size (NEO4J_MAX_CONNECTION_POOL_SIZE)"],
        ),
        (
            {"uri": "bolt://h", "max_connection_pool_size": 1, "pool_min_size": 2},
            ["pool_max_size (10, the default) exceeds max_connection_pool_size (1)"],
        ),
        (
            {"uri": "bolt://h", "prepare_timeout": 0},
            ["prepare_timeout (NEOPOOL_PREPARE_TIMEOUT)"],
        ),
        ({"uri": "bolt://h", "pool_max_sise": 3}, ["pool_max_sise", "known settings"]),
        (
            {"uri": "bolt://h", "connection_timeout": "soon"},
            ["connection_timeout (NEO4J_CONNECTION_TIMEOUT)", "number"],
        ),
    ],
)
def test_a_bad_value_fails_at_construction_naming_the_field_and_fix(
    settings: dict[str, object], names: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(password=SECRET, **settings)
    message = str(raised.value)
    for name in names:
        assert name in message
    assert SECRET not in message


def test_bad_environment_values_fail_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://h")
    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "ten")
    with pytest.raises(ConfigError, match=r"pool_max_size \(NEOPOOL_POOL_MAX_SIZE\)"):
        Neo4jConnectionConfig()


def test_credentials_in_the_uri_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri=f"bolt://neo4j:{SECRET}@localhost:7687")
    assert "NEO4J_USERNAME/NEO4J_PASSWORD" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_the_password_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    config = Neo4jConnectionConfig(uri="bolt://h", password=SECRET)
    logging.getLogger("test").warning("config is %r / %s", config, config)
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in str(config.model_dump())
    assert SECRET not in caplog.text


def test_config_is_immutable() -> None:
    config = Neo4jConnectionConfig(uri="bolt://h")
    with pytest.raises(Exception, match="frozen"):
        config.pool_max_size = 99  # type: ignore[misc]


# -- the URI, as the driver will read it ---------------------------------------------------
@pytest.mark.parametrize("uri", ["bolt://localhost:121969", "bolt://localhost:0", "bolt://h:65536"])
def test_a_port_out_of_range_is_refused_at_construction(uri: str) -> None:
    port = uri.rpartition(":")[2]
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri=uri)
    message = str(raised.value)
    assert "uri (NEO4J_URI)" in message
    assert f"port {port} is out of range" in message
    assert "1 to 65535" in message


@pytest.mark.parametrize(
    "uri", ["bolt://localhost:abc", "bolt://h:7687:1", "bolt://h:+12", "neo4j://[::1]:x"]
)
def test_a_port_that_is_not_a_number_is_refused_at_construction(uri: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri=uri)
    message = str(raised.value)
    assert "uri (NEO4J_URI)" in message
    assert "is not a number" in message
    assert "scheme://host:port" in message


@pytest.mark.parametrize(
    ("uri", "names"),
    [
        ("bolt://h:7687?policy=eu", ["has a query", "takes no routing context", "neo4j://"]),
        ("bolt+s://h?policy", ["has a query", "bolt+s://"]),
        ("neo4j://h?policy", ["routing context key 'policy' no value", "?key=value"]),
        ("neo4j://h?region=a&region=b", ["routing context key 'region' twice"]),
        ("neo4j://h?address=elsewhere:7687", ["'address'", "the driver sets itself"]),
        ("neo4j://h?=eu", ["entry without a key"]),
        ("neo4j://h:7687/graph", ["has a path ('/graph')", "NEO4J_DATABASE"]),
        ("bolt://h#top", ["has a fragment", "remove it"]),
        ("bolt://[::1]x", ["after the IPv6 address", "scheme://[address]:port"]),
        ("bolt://[::1", ["cannot be parsed"]),
        ("bolt://::1:7687", ["has no host", "brackets"]),
        ("bolt://h:7687 x", ["whitespace"]),
        ("bolt://lo\ncalhost", ["unprintable"]),
    ],
)
def test_a_uri_part_the_driver_rejects_or_ignores_is_refused_at_construction(
    uri: str, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri=uri, password=SECRET)
    message = str(raised.value)
    assert "uri (NEO4J_URI)" in message
    for name in names:
        assert name in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "uri",
    [
        "bolt://h",
        "bolt://h:1",
        "bolt://h:65535/",
        "bolt://h:7687?",
        "bolt+ssc://[::1]:7687",
        "neo4j://h:7687?policy=eu&region=west",
        "neo4j+s://h/?policy=eu",
    ],
)
def test_every_uri_form_the_driver_accepts_is_accepted(uri: str) -> None:
    assert Neo4jConnectionConfig(uri=uri).uri == uri


DRIVER_PROBES = [
    "bolt://h:7687",
    "bolt://h:7687?policy=eu",
    "bolt://h:7687/db",
    "bolt://h:7687#x",
    "neo4j://h:7687?policy=eu",
    "neo4j://h:7687?policy",
    "neo4j://h:7687?a=1&a=2",
    "neo4j://h:7687?address=x",
    "neo4j://h:7687/db",
    "neo4j://h:7687#x",
    "bolt://[::1",
]


#: What the driver ignores: neo4j 6 and later 5.x warn about it, older 5.x say nothing;
#: the config refuses it with every driver.
IGNORED_BY_THE_DRIVER = frozenset(uri for uri in DRIVER_PROBES if uri.endswith(("/db", "#x")))


@pytest.mark.parametrize("uri", DRIVER_PROBES)
async def test_a_uri_the_driver_refuses_or_warns_about_is_a_config_error(uri: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the driver deprecates paths and fragments (ignored)
        try:
            driver = AsyncGraphDatabase.driver(uri, auth=("neo4j", "x"))
        except Exception:
            driver = None
    if driver is not None:
        await driver.close()
    if driver is not None and uri not in IGNORED_BY_THE_DRIVER:
        Neo4jConnectionConfig(uri=uri)  # accepted by both
    else:
        with pytest.raises(ConfigError, match=r"uri \(NEO4J_URI\)"):
            Neo4jConnectionConfig(uri=uri)


# -- pool sizes ----------------------------------------------------------------------------
def test_pool_max_size_above_max_connection_pool_size_is_refused_at_construction() -> None:
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri="bolt://h", max_connection_pool_size=5, pool_max_size=8)
    message = str(raised.value)
    assert "pool_max_size (8) exceeds max_connection_pool_size (5)" in message
    assert "lower NEOPOOL_POOL_MAX_SIZE or raise NEO4J_MAX_CONNECTION_POOL_SIZE" in message


def test_a_small_driver_pool_from_the_environment_says_the_lease_default_is_too_big(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://h")
    monkeypatch.setenv("NEO4J_MAX_CONNECTION_POOL_SIZE", "4")
    with pytest.raises(ConfigError, match=r"pool_max_size \(10, the default\) exceeds"):
        Neo4jConnectionConfig()
    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "4")
    assert Neo4jConnectionConfig().pool_max_size == 4  # as many leases as sockets is fine


# -- strings the server cannot be sent -----------------------------------------------------
def test_an_undecodable_workspace_in_the_environment_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://h")
    monkeypatch.setenv("NEO4J_WORKSPACE", "team\udcff")  # the byte 0xff, via surrogateescape
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig()
    message = str(raised.value)
    assert "workspace (NEO4J_WORKSPACE): contains a lone surrogate (U+DCFF at index 4)" in message
    assert "pass valid Unicode" in message


@pytest.mark.parametrize("field", ["username", "database"])
def test_a_lone_surrogate_in_a_name_is_refused_at_construction(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field} \(NEO4J_{field.upper()}\): .*surrogate"):
        Neo4jConnectionConfig(uri="bolt://h", **{field: "ab\ud800"})


def test_a_lone_surrogate_in_the_password_is_refused_without_showing_it() -> None:
    password = SECRET + "\ud800"
    with pytest.raises(ConfigError) as raised:
        Neo4jConnectionConfig(uri="bolt://h", password=password)
    message = str(raised.value)
    assert "password (NEO4J_PASSWORD): contains a lone surrogate" in message
    assert SECRET not in message
    assert "index" not in message  # not even where in the password it is
