"""Neo4jConnectionConfig: explicit values or the environment, validated at construction."""

from __future__ import annotations

import logging

import pytest

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
    }
    assert (config.pool_max_size, config.pool_min_size, config.borrow_timeout) == (12, 3, 2.5)


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://from-env:7687")
    monkeypatch.setenv("NEOPOOL_POOL_MAX_SIZE", "4")
    config = Neo4jConnectionConfig(uri="neo4j://explicit:7687")
    assert config.uri == "neo4j://explicit:7687"
    assert config.pool_max_size == 4


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
            ["pool_min_size (2) exceeds max_connection_pool_size (1)"],
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
