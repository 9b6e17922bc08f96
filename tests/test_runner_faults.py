"""The runner's ends without a server: bounded waits after a signal, a stopped process
loop, tasks spawned by leftovers while they are cancelled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import neopool
from neopool import CallCancelled, runner
from runner_modes import MODES, runner_in_mode

pytestmark = pytest.mark.timeout(60)


class Interrupted(KeyboardInterrupt):
    """Raised from a signal handler, as Ctrl-C raises ``KeyboardInterrupt``.

    Not a plain ``Exception`` (as Celery's ``SoftTimeLimitExceeded`` is): the signal
    may land while the loop runs a callback, such as the one completing a sleep's
    future, and asyncio logs an ``Exception`` raised there and goes on. The future then
    never completes and the call waits forever; for Celery's exception ``AsyncTask``
    catches that case itself (``tests/celery/test_soft_time_limit_delivery.py``).
    """


@pytest.fixture
def interrupt_in() -> Iterator[Any]:
    """``interrupt_in(seconds)``: a SIGALRM then raises :class:`Interrupted` in the main thread."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    with runner_in_mode(request.param) as mode:
        yield mode


async def swallow_cancellation(released: threading.Event, seconds: float) -> None:
    """A coroutine that ignores every cancel until ``released`` is set (or ``seconds`` pass)."""
    end = time.monotonic() + seconds
    while not released.is_set() and time.monotonic() < end:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.02)


@pytest.mark.timing
def test_after_a_signal_the_wait_for_a_coroutine_that_swallows_cancellation_is_bounded(
    mode: str, interrupt_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "LEFTOVER_TIMEOUT", 0.25)
    released = threading.Event()
    interrupt_in(0.2)
    began = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            neopool.run(swallow_cancellation(released, 8))
        # 2 x LEFTOVER_TIMEOUT, in both modes; not the 8 s the coroutine would take.
        assert time.monotonic() - began < 4
    finally:
        released.set()  # the coroutine, still swallowing, may now end


@pytest.mark.timing
def test_after_a_signal_the_coroutine_and_what_it_spawned_end_within_one_bound_together(
    mode: str, interrupt_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 x LEFTOVER_TIMEOUT from the signal covers the coroutine's own cleanup and the
    tasks it left running, not each of them in turn."""
    monkeypatch.setattr(runner, "LEFTOVER_TIMEOUT", 0.5)
    released = threading.Event()
    left: list[asyncio.Task[None]] = []

    async def slow_to_end_and_leaves_a_stubborn_task() -> None:
        left.append(asyncio.ensure_future(swallow_cancellation(released, 8)))
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.shield(asyncio.sleep(0.9))  # its own cleanup: most of the bound

    began = time.monotonic()
    interrupt_in(0.2)
    try:
        with pytest.raises(Interrupted):
            neopool.run(slow_to_end_and_leaves_a_stubborn_task())
        after_the_signal = time.monotonic() - began - 0.2
    finally:
        released.set()
    assert after_the_signal < 2 * 0.5 + 0.2  # one bound (each in turn: 1.4 s)


def test_a_signal_as_the_coroutine_returns_is_raised_as_itself_and_the_next_call_runs() -> None:
    """The signal's exception leaves the loop just as the call's task ends (before asyncio
    has stopped the loop for it): it is not turned into a RuntimeError, what the call left
    running is cancelled, and the loop's next call is not stopped at once."""
    cleaned: list[bool] = []
    left: list[asyncio.Task[None]] = []

    async def leftover() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    def signal_handler_raising() -> None:
        raise KeyboardInterrupt("a signal")

    async def returns_as_the_signal_lands() -> int:
        left.append(asyncio.ensure_future(leftover()))
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(signal_handler_raising)  # after this last step
        return 1

    with pytest.raises(KeyboardInterrupt, match="a signal"):
        neopool.run(returns_as_the_signal_lands())
    assert cleaned == [True]
    assert neopool.run(asyncio.sleep(0, "next")) == "next"


def test_user_code_stopping_the_process_loop_gives_each_call_callcancelled_with_a_reason() -> None:
    runner.use_process_loop()
    try:
        waiting = threading.Event()

        async def wait_long() -> None:
            waiting.set()
            await asyncio.sleep(30)

        async def stop_the_loop() -> None:
            asyncio.get_running_loop().stop()
            await asyncio.sleep(30)

        other = concurrent.futures.ThreadPoolExecutor(1).submit(neopool.run, wait_long())
        assert waiting.wait(10)
        with pytest.raises(CallCancelled, match="stopped"):
            neopool.run(stop_the_loop())
        with pytest.raises(CallCancelled, match="stopped"):
            other.result(10)
        assert runner.calls_in_flight() == 0
        assert neopool.run(asyncio.sleep(0, "again")) == "again"  # a new loop starts
    finally:
        runner.use_process_loop(False)
        runner.close_process_loop(5)


def test_a_task_spawned_by_a_leftover_while_it_is_cancelled_ends_before_the_call_returns(
    mode: str,
) -> None:
    spawned: list[asyncio.Task[None]] = []
    ran_after_return: list[bool] = []
    returned = threading.Event()

    async def cleanup() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ran_after_return.append(returned.is_set())

    async def leftover() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            spawned.append(asyncio.ensure_future(cleanup()))

    kept: list[asyncio.Future[None]] = []

    async def call() -> None:
        kept.append(asyncio.ensure_future(leftover()))
        await asyncio.sleep(0)

    neopool.run(call())
    returned.set()
    assert len(spawned) == 1
    assert spawned[0].done()
    assert ran_after_return == [False]


@pytest.mark.timing
def test_collecting_the_tasks_leftovers_keep_spawning_is_bounded_in_total(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "LEFTOVER_TIMEOUT", 0.25)

    heads: list[asyncio.Future[None]] = []
    over = threading.Event()

    async def hydra() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            if not over.is_set():  # every cancel spawns another, until the test is over
                heads.append(asyncio.ensure_future(hydra()))

    async def call() -> None:
        heads.append(asyncio.ensure_future(hydra()))
        await asyncio.sleep(0)

    began = time.monotonic()
    try:
        neopool.run(call())
        assert time.monotonic() - began < 3
    finally:
        over.set()
