"""The blocked-loop detector on the process loop: one warning per call site, naming the call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

import neopool
from neopool import GlobalNeo4jConnectionPool, Neo4jConnectionConfig, runner
from neopool.blocked_loop import ENV, LoopWatch, blocking_site, watch
from neopool.errors import ConfigError
from neopool.stats import PROCESS
from neopool.testing import reset_registry
from polling import eventually

WATCHDOG = "neopool-blocked-loop-watch"
THRESHOLD = 0.1


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG]


def lookup_synchronously(seconds: float) -> None:
    """A synchronous call in a coroutine: the loop can do nothing else meanwhile."""
    time.sleep(seconds)


LOOKUP_LINE = lookup_synchronously.__code__.co_firstlineno + 2


async def enrich(seconds: float) -> str:
    lookup_synchronously(seconds)
    await asyncio.sleep(0)
    return "done"


async def other_place(seconds: float) -> None:
    time.sleep(seconds)  # a second call site, in this coroutine itself


def blocked_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "process loop was blocked" in r.getMessage()]


@contextlib.contextmanager
def on_the_process_loop() -> Iterator[None]:
    """Process-loop mode for a while; then the process loop is closed, and its watchdog ends."""
    runner.close_all_loops(10)
    runner.use_process_loop()
    try:
        yield
    finally:
        runner.use_process_loop(False)
        assert runner.close_process_loop(10)
        assert eventually(lambda: watchdogs() == [])  # it ends with its loop


@pytest.fixture
def process_loop(
    configure: Callable[..., Neo4jConnectionConfig],
) -> Iterator[None]:
    """The process loop, with a 0.1 s threshold, for one test; closed after it."""
    configure(blocked_loop_threshold=THRESHOLD)
    with on_the_process_loop():
        yield


@pytest.mark.timing
def test_a_blocking_call_is_named_once_per_call_site(
    process_loop: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    before = PROCESS.loop_blocks
    assert neopool.run(enrich(0.6)) == "done"
    assert eventually(lambda: len(blocked_warnings(caplog)) == 1)
    (line,) = blocked_warnings(caplog)
    assert f"lookup_synchronously() at {__file__}:{LOOKUP_LINE}" in line
    assert "called from coroutine enrich()" in line
    seconds = float(re.search(r"for about ([0-9.]+) s", line).group(1))  # type: ignore[union-attr]
    assert 0.4 <= seconds <= 1.5, line
    assert "blocked_loop_threshold" in line
    assert "NEOPOOL_BLOCKED_LOOP_THRESHOLD" in line

    # The same place again, in the same episode: counted, not said again.
    neopool.run(enrich(0.6))
    assert eventually(lambda: PROCESS.loop_blocks >= before + 2)
    # Another place is another warning.
    neopool.run(other_place(0.6))
    assert eventually(lambda: len(blocked_warnings(caplog)) == 2)
    assert f"coroutine other_place() at {__file__}" in blocked_warnings(caplog)[1]
    assert len(watchdogs()) == 1


@pytest.mark.timing
def test_an_idle_or_awaiting_loop_is_not_blocked(
    process_loop: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    before = PROCESS.loop_blocks

    async def wait_and_query() -> None:
        async with neopool.Neo4jConnectionFactory.borrow_connection() as borrowed:
            driver = await borrowed.get_driver()
            for _ in range(5):
                await driver.execute_query("RETURN 1")
        await asyncio.sleep(1.0)

    neopool.run(wait_and_query())
    assert blocked_warnings(caplog) == []
    assert PROCESS.loop_blocks == before


def test_off_at_zero_and_none(configure: Callable[..., Neo4jConnectionConfig]) -> None:
    loop = asyncio.new_event_loop()
    try:
        assert watch(loop, threading.current_thread(), 0) is None
        configure(blocked_loop_threshold=None)
        assert watch(loop, threading.current_thread()) is None
        configure(blocked_loop_threshold=0)
        runner.use_process_loop()
        try:
            assert neopool.run(enrich(0)) == "done"
            assert watchdogs() == []
        finally:
            runner.use_process_loop(False)
            assert runner.close_process_loop(10)
    finally:
        loop.close()


@pytest.fixture
def unconfigured() -> Iterator[None]:
    """No configuration set, for one test."""
    reset_registry()
    try:
        yield
    finally:
        reset_registry()


@pytest.mark.parametrize("value", ["abc", "-1", "inf"])
def test_a_bad_threshold_in_the_environment_is_named_when_no_configuration_is_set(
    unconfigured: None,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="neopool")
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError, match=ENV):  # what a configuration says of it
        Neo4jConnectionConfig(uri="bolt://localhost:7687")

    with on_the_process_loop():
        assert neopool.run(enrich(0)) == "done"
        assert len(watchdogs()) == 1  # watched with the default

    (line,) = [r.getMessage() for r in caplog.records if ENV in r.getMessage()]
    assert f"{ENV}={value!r} is not a valid blocked_loop_threshold" in line
    assert "default, 0.25 s" in line  # what is used instead
    assert "a number of seconds >= 0" in line  # and the fix


def test_it_stops_with_its_loop_and_never_keeps_it_alive(
    neopool_registry: GlobalNeo4jConnectionPool,
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    watcher = watch(loop, thread, THRESHOLD)
    assert isinstance(watcher, LoopWatch)
    assert eventually(lambda: watcher.watching)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    collected = weakref.ref(loop)
    del loop
    gc.collect()
    assert collected() is None
    assert eventually(lambda: not watcher.watching, timeout=5)


def test_a_forked_child_watches_only_once_its_own_loop_starts(
    process_loop: None,
) -> None:
    assert neopool.run(enrich(0)) == "done"
    assert len(watchdogs()) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            before = len(watchdogs())
            neopool.run(enrich(0))
            after = len(watchdogs())
            os.write(write, f"{before} {after}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        reply = answer.read().decode()
    os.waitpid(pid, 0)
    assert reply == "0 1"


def test_the_blocking_site_skips_the_loop_machinery() -> None:
    captured: list[object] = []

    async def coroutine_of_mine() -> None:
        import sys

        captured.append(blocking_site(sys._getframe()))

    asyncio.run(coroutine_of_mine())
    (site,) = captured
    assert site is not None
    assert site.function == "coroutine_of_mine"  # type: ignore[attr-defined]
    assert site.coroutine == "coroutine_of_mine"  # type: ignore[attr-defined]
    assert blocking_site(None) is None
