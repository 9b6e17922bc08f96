"""Under the threads and solo pools, AsyncTask watches a running task itself: a revoke
cancels its coroutine, its soft limit is thrown into it, and a coroutine that ignores
being ended does not hold the worker's thread for long: ``LEFTOVER_TIMEOUT`` after the
cancel the task ends without it (on a thread's loop, once what it left running has had
``LEFTOVER_TIMEOUT`` more).

The task is called as the worker calls it (``apply``: a request with an id), in each of
the runner's modes; a revoke is what the worker records when told of one
(``celery.worker.state.revoked``)."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError
from celery.worker import state as worker_state

from celery import Celery
from neopool import runner
from neopool.celery.task import AsyncTask, worker_pool
from polling import eventually

pytestmark = pytest.mark.timeout(60)

#: Seconds between revocation checks: short, so the tests take little time.
POLL = 0.05


@pytest.fixture
def short_leftover_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(runner, "LEFTOVER_TIMEOUT", 0.25)
    return 0.25


def revoke(task_id: str) -> None:
    """What the worker does when told to revoke ``task_id``."""
    worker_state.revoked.add(task_id)


@pytest.fixture(autouse=True)
def forget_revokes() -> Iterator[None]:
    yield
    worker_state.revoked.clear()


def test_a_revoked_running_task_has_its_coroutine_cancelled_and_fails_as_revoked(
    app: Celery, mode: str
) -> None:
    seen: list[str] = []

    @app.task(base=AsyncTask, bind=True, shared=False, revocation_poll=POLL)  # type: ignore[untyped-decorator]
    async def held(self: Any) -> str:
        revoke(self.request.id)
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "ran to the end"

    began = time.monotonic()
    result = held.apply()
    assert isinstance(result.result, TaskRevokedError), result.traceback
    assert seen == ["cancelled"]
    assert time.monotonic() - began < 10  # not the 20 s it would have run


def test_a_revoked_task_whose_coroutine_returns_anyway_still_fails_as_revoked(
    app: Celery, mode: str
) -> None:
    @app.task(base=AsyncTask, bind=True, shared=False, revocation_poll=POLL)  # type: ignore[untyped-decorator]
    async def partial(self: Any) -> str:
        revoke(self.request.id)
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            return "partial"
        return "ran to the end"

    result = partial.apply()
    assert isinstance(result.result, TaskRevokedError), result.traceback


def test_a_task_not_revoked_runs_past_many_checks_to_its_end(app: Celery, mode: str) -> None:
    @app.task(base=AsyncTask, shared=False, soft_time_limit=30, revocation_poll=POLL)  # type: ignore[untyped-decorator]
    async def steady() -> str:
        await asyncio.sleep(10 * POLL)
        return "done"

    assert [steady.apply().get() for _ in range(3)] == ["done"] * 3


class Stubborn:
    """A coroutine that ignores every cancel until the test lets it go."""

    def __init__(self) -> None:
        self.ignored = 0
        self.finished = threading.Event()
        self.released = threading.Event()

    async def run(self) -> None:
        try:
            while not self.released.is_set():
                try:
                    await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    self.ignored += 1
        finally:
            self.finished.set()


@pytest.mark.timing
def test_a_coroutine_that_ignores_its_revoke_is_left_running_and_the_task_still_ends(
    app: Celery, mode: str, short_leftover_timeout: float, caplog: pytest.LogCaptureFixture
) -> None:
    stubborn = Stubborn()
    child_cancelled = threading.Event()
    spawned: list[asyncio.Task[None]] = []

    async def child() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            child_cancelled.set()
            raise

    @app.task(base=AsyncTask, bind=True, shared=False, revocation_poll=POLL)  # type: ignore[untyped-decorator]
    async def ignores_it(self: Any) -> None:
        spawned.append(asyncio.create_task(child()))  # left to the call's end
        revoke(self.request.id)
        await stubborn.run()

    began = time.monotonic()
    try:
        result = ignores_it.apply()
        took = time.monotonic() - began
        assert isinstance(result.result, TaskRevokedError), result.traceback
        assert stubborn.ignored >= 1
        assert not stubborn.finished.is_set()  # left running: the task ended without it
        assert runner.calls_in_flight() == 0  # a shutdown's drain does not wait for it
        assert eventually(child_cancelled.is_set)  # what it spawned is cancelled, as ever
        # The revoke's cancel and the leftovers' each get LEFTOVER_TIMEOUT, after a poll.
        assert took < 2 * short_leftover_timeout + POLL + 2
        assert "left running" in caplog.text
    finally:
        stubborn.released.set()
    # It ends once let go, cancelled: asyncio reports no outcome nobody asked for.
    runner.close_all_loops(5)
    assert stubborn.finished.is_set()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


@pytest.mark.timing
def test_a_coroutine_that_does_not_end_after_its_soft_limit_is_left_and_the_task_fails(
    app: Celery, mode: str, short_leftover_timeout: float
) -> None:
    stubborn = Stubborn()

    @app.task(base=AsyncTask, shared=False, soft_time_limit=0.1)  # type: ignore[untyped-decorator]
    async def overruns() -> None:
        try:
            await asyncio.sleep(20)
        except SoftTimeLimitExceeded:
            await stubborn.run()  # a clean-up that never ends

    began = time.monotonic()
    try:
        result = overruns.apply()
        took = time.monotonic() - began
        assert isinstance(result.result, SoftTimeLimitExceeded), result.traceback
        assert stubborn.ignored >= 1  # cancelled once its time to clean up was over
        assert not stubborn.finished.is_set()
        assert took < 0.1 + 3 * short_leftover_timeout + 2
    finally:
        stubborn.released.set()


@pytest.mark.timing
def test_a_later_call_on_the_loop_is_not_ended_by_a_call_given_up_before_it(
    short_leftover_timeout: float,
) -> None:
    """A call ended by a signal while its coroutine ignored the cancel (left running on
    the main thread's loop, a watch of its may still fire): its give-up leaves the
    loop's later calls alone."""
    stubborn = Stubborn()
    gave_up: list[Any] = []

    class Interrupted(KeyboardInterrupt):
        """As Ctrl-C: never lost in a loop callback (see tests/test_runner_faults.py)."""

    async def first() -> None:
        gave_up.append(runner._this_call().give_up)
        await stubborn.run()

    async def second() -> str:
        asyncio.get_running_loop().call_soon(gave_up[0], TaskRevokedError("stale"))
        await asyncio.sleep(0.05)
        return "ran to the end"

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Interrupted):
            runner.run(first())  # ended after 2 x LEFTOVER_TIMEOUT, its coroutine left
        assert not stubborn.finished.is_set()
        assert runner.run(second()) == "ran to the end"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        stubborn.released.set()
        runner.close_all_loops(5)


def test_a_call_given_up_on_as_its_coroutine_returns_leaves_the_next_call_alone(
    mode: str,
) -> None:
    async def returns_as_given_up() -> str:
        asyncio.get_running_loop().call_soon(runner._this_call().give_up, TaskRevokedError("late"))
        await asyncio.sleep(0)  # resumed in the iteration that gives it up
        return "returned"

    async def next_call() -> str:
        await asyncio.sleep(0.01)
        return "next"

    with pytest.raises(TaskRevokedError) if mode == "process" else _returns_or_revoked():
        runner.run(returns_as_given_up())
    assert runner.run(next_call()) == "next"


class _returns_or_revoked:
    """On a thread's loop the call returned as it was given up: either outcome stands."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is None or issubclass(exc_type, TaskRevokedError)


def test_a_loop_that_ran_watched_tasks_is_freed_once_closed(app: Celery) -> None:
    @app.task(base=AsyncTask, shared=False, soft_time_limit=30, revocation_poll=POLL)  # type: ignore[untyped-decorator]
    async def watched() -> str:
        await asyncio.sleep(0)
        return "done"

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    def in_a_thread() -> None:
        assert watched.apply().get() == "done"
        loops.append(weakref.ref(runner.thread_loop()))
        runner.close_thread_loop()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    gc.collect()
    assert loops
    assert loops[0]() is None


def test_under_prefork_the_loops_own_exception_handler_still_gets_everything_else(
    app: Celery,
) -> None:
    """The handler that catches a soft limit landing in a loop callback stays on the loop
    (installed by the first task): what is not a soft limit still reaches the handler set
    before it, during a task and after it."""
    seen: list[type[BaseException]] = []

    def fails() -> None:
        raise ValueError("a callback's own error")

    @app.task(base=AsyncTask, shared=False)  # type: ignore[untyped-decorator]
    async def task_with_a_failing_callback() -> str:
        asyncio.get_running_loop().call_soon(fails)
        await asyncio.sleep(0.01)
        return "done"

    async def later_call() -> None:
        asyncio.get_running_loop().call_soon(fails)
        await asyncio.sleep(0.01)

    runner.thread_loop().set_exception_handler(
        lambda loop, context: seen.append(type(context.get("exception")))
    )
    worker_pool("prefork")
    try:
        assert task_with_a_failing_callback.apply().get() == "done"
        runner.run(later_call())
    finally:
        worker_pool("threads")
        runner.close_all_loops(5)
    assert seen == [ValueError, ValueError]
