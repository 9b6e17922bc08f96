"""Celery's clean-up pattern in an async task: ``except SoftTimeLimitExceeded`` runs at the
coroutine's await point, and a task that handles it and returns succeeds.

The three ways a soft limit reaches a task: the timer AsyncTask keeps (threads, solo),
prefork's signal raised while the loop waits, and that signal landing in a loop callback.
The signal is reproduced as billiard raises it: a handler in the main thread."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from celery import Celery
from neopool.celery.task import AsyncTask, worker_pool

pytestmark = pytest.mark.timeout(60)

#: Each test's soft limit, in seconds: the coroutine is waiting at its await by then.
SOFT_LIMIT = 0.2


@pytest.fixture(params=["timer", "signal", "signal-in-callback"])
def delivery(request: pytest.FixtureRequest) -> Iterator[str]:
    """How the limit comes: AsyncTask's own timer, or prefork's signal (SIGALRM here)."""
    if request.param == "timer":
        yield request.param
        return

    def soft_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_limit)
    worker_pool("prefork")
    try:
        signal.setitimer(signal.ITIMER_REAL, SOFT_LIMIT)
        yield request.param
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        worker_pool("threads")
        signal.signal(signal.SIGALRM, previous)


def busy_in_callbacks(seconds: float) -> asyncio.Future[None]:
    """The loop busy in plain callbacks (a driver decoding records): a signal lands there."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    end = time.monotonic() + seconds

    def chunk() -> None:
        until = time.monotonic() + 0.02
        while time.monotonic() < until:
            pass
        if time.monotonic() < end and not finished.done():
            loop.call_soon(chunk)
        elif not finished.done():
            finished.set_result(None)

    loop.call_soon(chunk)
    return finished


async def wait_for_io(how: str) -> None:
    if how == "signal-in-callback":
        await busy_in_callbacks(20)
    else:
        await asyncio.sleep(20)


def test_a_task_that_catches_its_soft_limit_at_an_await_cleans_up_and_succeeds(
    app: Celery, mode: str, delivery: str
) -> None:
    seen: list[str] = []

    async def query() -> None:  # a helper, awaited by the task: the limit reaches it here
        try:
            await wait_for_io(delivery)
        except asyncio.CancelledError:
            seen.append("CancelledError")
            raise

    @app.task(base=AsyncTask, soft_time_limit=SOFT_LIMIT, shared=False)  # type: ignore[untyped-decorator]
    async def clean_up() -> str:
        try:
            await query()
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.05)  # clean-up may await
            return "cleaned up"
        return "ran to the end"

    began = time.monotonic()
    result = clean_up.apply()
    assert result.successful(), result.traceback
    assert result.get() == "cleaned up"
    assert seen == []
    assert time.monotonic() - began < 10


def test_a_task_that_does_not_catch_its_soft_limit_fails_with_it(
    app: Celery, mode: str, delivery: str
) -> None:
    @app.task(base=AsyncTask, soft_time_limit=SOFT_LIMIT, shared=False)  # type: ignore[untyped-decorator]
    async def overrun() -> str:
        await wait_for_io(delivery)
        return "ran to the end"

    result = overrun.apply()
    assert isinstance(result.result, SoftTimeLimitExceeded), result.traceback


@pytest.mark.parametrize("delivery", ["signal", "signal-in-callback"], indirect=True)
def test_under_prefork_a_revokes_signal_ends_a_task_without_a_soft_limit_of_its_own(
    app: Celery, mode: str, delivery: str
) -> None:
    """``revoke(task_id, terminate=True, signal="SIGUSR1")``: Celery's soft-limit signal
    reaches a task that has no soft limit, wherever the loop is when it lands."""

    @app.task(base=AsyncTask, shared=False)  # type: ignore[untyped-decorator]
    async def revoked() -> str:
        await wait_for_io(delivery)
        return "ran to the end"

    began = time.monotonic()
    revoked.push_request(id="revoked-by-signal", called_directly=False)  # as the worker calls it
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            revoked()
    finally:
        revoked.pop_request()
    assert time.monotonic() - began < 10  # not the 20 s it would have run


@pytest.mark.parametrize("delivery", ["signal-in-callback"], indirect=True)
def test_under_prefork_a_revoke_that_the_coroutine_turns_into_a_return_still_fails_the_task(
    app: Celery, mode: str, delivery: str
) -> None:
    """A revoke's signal landing in a callback cancels the coroutine; one that catches the
    cancel and returns does not turn the revoked task into a success."""

    @app.task(base=AsyncTask, shared=False)  # type: ignore[untyped-decorator]
    async def partial() -> str:
        try:
            await wait_for_io(delivery)
        except asyncio.CancelledError:
            return "partial"
        return "ran to the end"

    partial.push_request(id="revoked-and-returning", called_directly=False)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            partial()
    finally:
        partial.pop_request()
