"""A long-lived event loop per thread, so pools are reused from one call to the next.

``asyncio.run`` makes a new loop on every call: a Celery task that uses it opens
a new driver (TCP, Bolt handshake, authentication) every time, because neopool
keeps one driver per loop. :func:`run` instead keeps one loop per thread for
the life of the thread, so the second call borrows from the driver the first one
opened.

Each call still has ``asyncio.run``'s semantics: tasks the call spawned and
left running are cancelled and awaited before it returns. Only the loop, its
pool and its driver live on.

The runner owns these loops; nothing else runs or closes them. Each is an
:class:`asyncio.Runner`, closed the way ``asyncio.run`` closes its loop
(remaining tasks cancelled, async generators shut down, which closes the loop's
pool gracefully, default executor joined), always within a deadline:

* on :func:`close_thread_loop`, called from that thread;
* when the thread ends;
* by :func:`close_all_loops` (neopool.celery calls it at worker shutdown) and at
  interpreter exit. A loop busy at that moment is closed by its own thread as
  soon as the call it is running returns.

After ``fork`` the child forgets the parent's loops without closing them
(closing a copied loop would unregister descriptors from the epoll instance the
child shares with its parent).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from neopool._release import keep_inherited_loop
from neopool.errors import NeopoolError

if sys.version_info >= (3, 11):
    from asyncio import Runner
else:  # pragma: no cover - exercised on 3.10 only
    from backports.asyncio.runner import Runner

logger = logging.getLogger("neopool")

T = TypeVar("T")


class _Runner(Protocol):
    """What neopool uses of :class:`asyncio.Runner` (or its backport on 3.10)."""

    def run(
        self, coro: Coroutine[Any, Any, T], *, context: contextvars.Context | None = None
    ) -> T: ...

    def close(self) -> None: ...

    def get_loop(self) -> asyncio.AbstractEventLoop: ...


#: Seconds a loop's close may take when the caller gives no deadline.
DEFAULT_CLOSE_TIMEOUT = 10.0
#: Seconds the tasks a call left behind get to finish after being cancelled.
LEFTOVER_TIMEOUT = 5.0

#: The call (of :func:`run`) whose code is running, for the tasks it spawns.
_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "neopool_current_call", default=None
)


class LoopAlreadyRunning(NeopoolError, RuntimeError):
    """:func:`run` was called where an event loop is already running."""


class _Call:
    """One :func:`run` call: the tasks its code spawned (weakly)."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def _task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    """Create tasks as usual, and note each under the call whose code spawned it."""
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
    call = _current_call.get()
    if call is not None:
        call.tasks.add(task)
    return task


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()  # the policy's loop: uvloop where it is installed
    loop.set_task_factory(_task_factory)  # type: ignore[arg-type]
    return loop


class _PersistentLoop:
    """One thread's loop; its lock makes running and closing exclusive."""

    def __init__(self, thread: threading.Thread) -> None:
        self.runner: _Runner = Runner(loop_factory=_new_loop)
        self.loop = self.runner.get_loop()
        self.thread_name = thread.name
        self.thread_ident = thread.ident
        self.lock = threading.Lock()  # held while the loop runs or closes
        self.pid = os.getpid()
        #: Set by a close that found the loop busy: its thread closes it after the call.
        self.close_requested = False

    @property
    def closed(self) -> bool:
        return bool(self.loop.is_closed())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one call (the caller holds :attr:`lock`)."""
        call = _Call()
        main: list[asyncio.Task[T]] = []
        context = contextvars.copy_context()
        context.run(_current_call.set, call)
        try:
            return self.runner.run(_as_call(coro, call, main), context=context)
        except BaseException:
            # Raised out of the loop by a signal handler (soft time limit, Ctrl-C)
            # while the call was suspended: cancel it and let it clean up here.
            if main and not main[0].done() and not self.loop.is_closed():
                main[0].cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(main[0])
            raise

    def close(self, timeout: float) -> bool:
        """Close the loop within ``timeout``; ``False`` if it stayed busy that long."""
        if not self.lock.acquire(timeout=max(0.0, timeout)):
            self.close_requested = True
            return False
        try:
            self.close_locked(timeout)
            return True
        finally:
            self.lock.release()

    def close_locked(self, timeout: float) -> None:
        """Close as ``asyncio.run`` would, cut short at ``timeout`` (the caller holds the lock).

        When time runs out the loop is stopped and closed as it is; its pool
        then has its sockets released by the registry.
        """
        if self.closed:
            return
        stop = self.loop.call_later(timeout, self.loop.stop)
        try:
            self.runner.close()
        except RuntimeError as exc:  # stopped at the deadline, or the interpreter is ending
            logger.warning(
                "neopool: closing the event loop of thread %s did not finish within "
                "%.1f s (%s); closed it as it was",
                self.thread_name,
                timeout,
                exc,
            )
        finally:
            stop.cancel()
            _sweep_pools()


async def _as_call(coro: Coroutine[Any, Any, T], call: _Call, main: list[asyncio.Task[T]]) -> T:
    """Run ``coro``; then cancel and await what it spawned and left running."""
    me = asyncio.current_task()
    assert me is not None
    main.append(me)
    try:
        return await coro
    finally:
        await _cancel_leftovers(call, me)


async def _cancel_leftovers(call: _Call, me: asyncio.Task[Any]) -> None:
    leftovers = [task for task in call.tasks if task is not me and not task.done()]
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    _, stuck = await asyncio.wait(leftovers, timeout=LEFTOVER_TIMEOUT)
    for task in stuck:
        logger.warning(
            "neopool: task %r, spawned by a neopool.run() call and left running, ignored "
            "cancellation for %.0f s; left running",
            task,
            LEFTOVER_TIMEOUT,
        )


class _Holder:
    """Lives in the thread-local; its finaliser closes the loop when the thread ends."""

    __slots__ = ("__weakref__", "state")

    def __init__(self, state: _PersistentLoop) -> None:
        self.state = state


_local = threading.local()
_all_lock = threading.Lock()
#: Every persistent loop of this process, by the thread that owns it.
_all: dict[int, _PersistentLoop] = {}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on this thread's persistent event loop.

    The loop is created on the first call in a thread and reused by every later
    call there, with its neopool pool and driver. As with ``asyncio.run``,
    tasks the coroutine spawned and left running are cancelled and awaited
    before this returns. If the call is interrupted (a Celery soft time limit,
    ``KeyboardInterrupt``), the coroutine is cancelled and run until it has
    finished, so leases it holds are returned before the exception propagates.

    Raises :class:`LoopAlreadyRunning` when called from async code: ``await``
    the coroutine there instead.
    """
    if not asyncio.iscoroutine(coro):
        raise TypeError(f"neopool.run() takes a coroutine, not {type(coro).__name__}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise LoopAlreadyRunning(
            "neopool.run() was called while an event loop is running in this thread; "
            "it blocks until the coroutine finishes, which would stall that loop. "
            "Await the coroutine instead."
        )
    while True:
        state = _thread_loop()
        with state.lock:
            if state.closed:  # closed by close_all_loops() since: start a new one
                continue
            try:
                return state.run(coro)
            finally:
                if state.close_requested:
                    state.close_locked(DEFAULT_CLOSE_TIMEOUT)


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's persistent loop (created if needed); run it with :func:`run`."""
    return _thread_loop().loop


def _thread_loop() -> _PersistentLoop:
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is not None and not holder.state.closed and holder.state.pid == os.getpid():
        return holder.state
    thread = threading.current_thread()
    state = _PersistentLoop(thread)
    holder = _Holder(state)
    _local.holder = holder
    weakref.finalize(holder, _thread_ended, state).atexit = False
    with _all_lock:
        assert state.thread_ident is not None
        _all[state.thread_ident] = state
    return state


def owns(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` is one of the runner's persistent loops."""
    return _state_of(loop) is not None


def _state_of(loop: asyncio.AbstractEventLoop) -> _PersistentLoop | None:
    with _all_lock:
        return next((s for s in _all.values() if s.loop is loop), None)


def run_on_idle_loop(
    loop: asyncio.AbstractEventLoop,
    work: Callable[[], Coroutine[Any, Any, None]],
    timeout: float,
) -> concurrent.futures.Future[None] | None:
    """Run ``work()`` on ``loop`` from a helper thread, if it is the runner's and idle now.

    ``None`` if the loop is not the runner's or is busy (then it is running, and
    the caller schedules on it instead). The run is cut short at ``timeout``.
    """
    state = _state_of(loop)
    if state is None or not state.lock.acquire(blocking=False):
        return None
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run_it() -> None:
        try:
            if not state.closed:
                _run_within(state.loop, work(), timeout)
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
        finally:
            state.lock.release()

    threading.Thread(target=run_it, name="neopool-close", daemon=True).start()
    return done


def _run_within(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], timeout: float
) -> None:
    task = loop.create_task(coro)
    stop = loop.call_later(timeout, loop.stop)
    try:
        loop.run_until_complete(task)
    except RuntimeError:  # stopped at the deadline: the close inside ends in terminate
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
    finally:
        stop.cancel()


def close_thread_loop(timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
    """Close the calling thread's persistent loop, if it has one.

    Its pool closes gracefully on the loop; the next :func:`run` in this
    thread starts a new loop.
    """
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is None:
        return
    _local.holder = None
    _forget(holder.state)
    holder.state.close(timeout)


def close_all_loops(timeout: float = DEFAULT_CLOSE_TIMEOUT) -> int:
    """Close every persistent loop of this process within ``timeout`` seconds in all.

    Idle loops are closed first, then busy ones as they become free. A loop
    still busy at the deadline is closed by its own thread as soon as its
    current call returns. Works from async code too (the closing then happens
    on a helper thread, since a thread cannot run two loops). Returns how many
    loops were closed here.
    """
    deadline = time.monotonic() + timeout
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _close_all_until(deadline)
    closer: concurrent.futures.Future[int] = concurrent.futures.Future()

    def close_all() -> None:
        try:
            closer.set_result(_close_all_until(deadline))
        except BaseException as exc:
            closer.set_exception(exc)

    threading.Thread(target=close_all, name="neopool-close", daemon=True).start()
    try:
        return closer.result(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
    except concurrent.futures.TimeoutError:
        return 0


def _close_all_until(deadline: float, *, wait_for_busy: bool = True) -> int:
    with _all_lock:
        states = list(_all.values())
    closed = 0
    busy = []
    for state in states:
        if state.pid != os.getpid() or state.closed:
            _forget(state)
        elif state.lock.acquire(blocking=False):
            closed += _close_and_release(state, deadline)
        else:
            busy.append(state)
    for state in busy:
        wait = max(0.0, deadline - time.monotonic()) if wait_for_busy else 0.0
        if state.lock.acquire(timeout=wait):
            closed += _close_and_release(state, deadline)
        else:
            state.close_requested = True
            logger.warning(
                "neopool: the event loop of thread %s is busy; it closes when its "
                "current call returns",
                state.thread_name,
            )
    return closed


def _close_and_release(state: _PersistentLoop, deadline: float) -> int:
    """Close a loop whose lock the caller took; 1 if it was open."""
    try:
        was_open = not state.closed
        state.close_locked(max(0.0, deadline - time.monotonic()))
        _forget(state)
        return int(was_open)
    finally:
        state.lock.release()


def loops() -> dict[str, asyncio.AbstractEventLoop]:
    """``{thread name: loop}`` of every open persistent loop of this process."""
    with _all_lock:
        return {s.thread_name: s.loop for s in _all.values() if not s.closed}


def _forget(state: _PersistentLoop) -> None:
    with _all_lock:
        if state.thread_ident is not None and _all.get(state.thread_ident) is state:
            del _all[state.thread_ident]


def _thread_ended(state: _PersistentLoop) -> None:
    """The owning thread has ended (or dropped its thread-local): close its loop.

    In a forked child this can run as the interpreter drops the parent's other
    threads, before any at-fork hook: the loop is then the parent's, kept and
    never closed from here.
    """
    if state.pid != os.getpid():
        keep_inherited_loop(state.loop)
        return
    _forget(state)
    try:
        state.close(timeout=DEFAULT_CLOSE_TIMEOUT)
    except Exception:  # a finaliser must not raise
        logger.debug("neopool: closing the loop of ended thread %s failed", state.thread_name)


def _sweep_pools() -> None:
    """Let the registry release pools of a loop that closed before they could."""
    from neopool.registry import GlobalNeo4jConnectionPool

    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry.sweep()


@atexit.register
def _close_at_exit() -> None:
    """Close idle loops at exit; a loop still running in a daemon thread is not waited for."""
    _close_all_until(time.monotonic() + DEFAULT_CLOSE_TIMEOUT, wait_for_busy=False)


def after_fork_in_child() -> None:
    """Forget the parent's loops without closing them (see the module's docstring)."""
    global _all_lock
    _all_lock = threading.Lock()
    states = list(_all.values())
    _all.clear()
    for state in states:
        keep_inherited_loop(state.loop)
        state.lock = threading.Lock()
