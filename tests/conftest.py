"""The suite runs on real servers: see neopool.testing.plugin for the fixtures.

Shared here: ``configure`` (the registry set up for one test, reset after it),
``unraisable`` (no exception may escape a finalizer), and ``bolt_proxy`` with
``worker_config`` (what worker subprocesses connect with, counted; the Celery and
LightRAG tests). Helpers every package imports are plain modules in
``tests/support`` (on the test path): ``polling``, ``user_code``,
``exception_chain``, ``celery_helpers``, ``forking`` and ``runner_modes``.

Tiers: every test is marked by what it needs (:func:`pytest_collection_modifyitems`),
from the fixtures it uses and the directory it lives in, so that
``pytest -m "not server and not subprocess"`` (``make test-fast``) runs the tests
that need neither a server nor a child process.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Imported here, not first inside a property test: pytest rewrites Hypothesis's modules
# as it imports them, and on CPython 3.11 parsing one while Hypothesis has changed the
# recursion limit can fail ("AST constructor recursion depth mismatch").
import hypothesis.internal.conjecture.optimiser
import hypothesis.internal.conjecture.shrinker  # noqa: F401
import pytest

import neopool.testing.plugin
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig
from neopool.testing import BoltTarget, TcpProxy

#: Marks given to a test that uses one of these fixtures (directly or through another).
MARKS_BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "neopool_bolt": ("server",),
    "neopool_broker_url": ("server", "celery"),
    "start_worker": ("celery", "subprocess"),
    "start_process_worker": ("celery", "subprocess"),
    "neopool_tls_certificates": ("tls",),
    "neopool_tls_proxy": ("tls",),
}
#: Marks given to every test under one of these directories (relative to tests/).
MARKS_BY_DIRECTORY: dict[str, tuple[str, ...]] = {
    "celery": ("celery",),
    "lightrag": ("lightrag",),
}
#: Marks given to every test of one of these modules (relative to tests/).
MARKS_BY_MODULE: dict[str, tuple[str, ...]] = {
    "test_tls.py": ("tls",),
    "test_config_tls.py": ("tls",),
    "reliability/test_tls_proxy.py": ("tls",),
}
TESTS = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    """Use the fixtures of ``neopool.testing.plugin`` once, under the name its entry point gives.

    An installed neopool registers the plugin through its ``pytest11`` entry point;
    a source tree whose metadata predates it, or a run with plugin autoloading
    off, gets it here instead, never twice.
    """
    if not config.pluginmanager.has_plugin("neopool"):
        config.pluginmanager.register(neopool.testing.plugin, "neopool")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it needs: its fixtures, its directory, its module."""
    for item in items:
        names: set[str] = set()
        for fixture in getattr(item, "fixturenames", ()):
            names.update(MARKS_BY_FIXTURE.get(fixture, ()))
        try:
            relative = item.path.relative_to(TESTS).as_posix()
        except ValueError:  # not under tests/
            relative = ""
        names.update(MARKS_BY_DIRECTORY.get(relative.split("/", 1)[0], ()))
        names.update(MARKS_BY_MODULE.get(relative, ()))
        for name in sorted(names - {mark.name for mark in item.iter_markers()}):
            item.add_marker(name)


@pytest.fixture
def configure(
    neopool_registry: GlobalNeo4jConnectionPool, neopool_bolt: BoltTarget
) -> Callable[..., Neo4jConnectionConfig]:
    """Configure the registry with ``neopool_bolt.config(**settings)`` for this test only.

    ``neopool_registry`` empties the registry and forgets the configuration and
    the driver factory after the test, whatever it set.
    """

    def configure(**settings: Any) -> Neo4jConnectionConfig:
        config = neopool_bolt.config(**settings)
        GlobalNeo4jConnectionPool.set_config(config)
        return config

    return configure


@pytest.fixture
def bolt_proxy(neopool_bolt: BoltTarget) -> Iterator[TcpProxy]:
    """A counting TCP proxy in front of ``neopool_bolt.uri``: how many connections workers open.

    Unlike ``neopool_proxy`` it never terminates TLS: it passes the bytes on to
    ``neopool_bolt.uri`` as they are.
    """
    host, port = neopool_bolt.uri.split("://", 1)[1].rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        yield proxy


@pytest.fixture
def worker_config(neopool_bolt: BoltTarget, bolt_proxy: TcpProxy) -> Neo4jConnectionConfig:
    """What worker subprocesses connect with: the Bolt server, through ``bolt_proxy``."""
    scheme = neopool_bolt.uri.split("://", 1)[0]
    return neopool_bolt.config(uri=bolt_proxy.uri(scheme))


@pytest.fixture
def unraisable() -> Iterator[list[Any]]:
    """Every exception that escapes a finalizer during the test (there must be none)."""
    seen: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append((info.exc_type, info.exc_value, info.object))
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert not seen, f"exceptions escaped finalizers: {seen}"
