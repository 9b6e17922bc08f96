"""A long-lived event loop per thread, so pools are reused from one call to the next.

``asyncio.run`` makes a new loop on every call: a Celery task that uses it opens
a new driver (TCP, Bolt handshake, authentication) every time, because neopool
keeps one driver per loop. :func:`run` instead keeps one loop per thread for
the life of the thread, so the second call borrows from the driver the first one
opened.

A thread's loop is closed the way ``asyncio.run`` closes its loop (remaining
tasks cancelled, async generators shut down, which closes the loop's pool
gracefully, default executor joined):

* on :func:`close_thread_loop`, called from that thread;
* when the thread ends (its thread-local state is released);
* by :func:`close_all_loops` (neopool.celery calls it at worker shutdown) and at
  interpreter exit, for loops whose threads are gone or idle.

After ``fork`` the child forgets the parent's loops: it never runs or closes them
(closing a copied loop would unregister descriptors from the epoll instance the
child shares with its parent).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from neopool._orphans import retire_inherited_loop
from neopool.errors import NeopoolError

logger = logging.getLogger("neopool")

T = TypeVar("T")


class LoopAlreadyRunning(NeopoolError, RuntimeError):
    """:func:`run` was called where an event loop is already running."""


class _ThreadLoop:
    """One thread's persistent loop, and the lock that makes running and closing exclusive."""

    def __init__(self, thread: threading.Thread) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread_name = thread.name
        self.thread_ident = thread.ident
        self.lock = threading.Lock()  # held while the loop runs or closes
        self.pid = os.getpid()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self.lock:
            return _run_cancelling_on_interrupt(self.loop, coro)

    def close(self, timeout: float | None = None) -> bool:
        """Close the loop as ``asyncio.run`` would; ``False`` if it is busy elsewhere."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            if not self.loop.is_closed():
                _shut_down(self.loop)
            return True
        finally:
            self.lock.release()


class _Holder:
    """Lives in the thread-local; its finaliser closes the loop when the thread ends."""

    __slots__ = ("__weakref__", "state")

    def __init__(self, state: _ThreadLoop) -> None:
        self.state = state


_local = threading.local()
_all_lock = threading.Lock()
#: Every persistent loop of this process, by the thread that owns it.
_all: dict[int, _ThreadLoop] = {}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on this thread's persistent event loop.

    The loop is created on the first call in a thread and reused by every later
    call there, with its neopool pool and driver. If the call is interrupted
    (a Celery soft time limit, ``KeyboardInterrupt``), the coroutine is
    cancelled and run until it has finished, so leases it holds are returned
    before the exception propagates.

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
    return _thread_loop().run(coro)


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's persistent loop (created if needed); run it with :func:`run`."""
    return _thread_loop().loop


def _thread_loop() -> _ThreadLoop:
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is not None and not holder.state.closed and holder.state.pid == os.getpid():
        return holder.state
    thread = threading.current_thread()
    state = _ThreadLoop(thread)
    holder = _Holder(state)
    _local.holder = holder
    weakref.finalize(holder, _thread_ended, state)
    with _all_lock:
        assert state.thread_ident is not None
        _all[state.thread_ident] = state
    return state


def close_thread_loop() -> None:
    """Close the calling thread's persistent loop, if it has one.

    Its pool closes gracefully on the loop; the next :func:`run` in this
    thread starts a new loop.
    """
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is None:
        return
    _local.holder = None
    _forget(holder.state)
    holder.state.close()


def close_all_loops(timeout: float = 10.0) -> int:
    """Close every persistent loop of this process that is not running; return how many.

    Each loop is run one last time to close its pool; a loop whose thread is
    running it now is left alone (its thread closes it when it ends).
    """
    with _all_lock:
        states = list(_all.values())
    closed = 0
    for state in states:
        if state.pid != os.getpid() or state.closed:
            _forget(state)
            continue
        if state.close(timeout=timeout):
            _forget(state)
            closed += 1
        else:
            logger.warning(
                "neopool: the event loop of thread %s is still running; not closed",
                state.thread_name,
            )
    return closed


def loops() -> dict[str, asyncio.AbstractEventLoop]:
    """``{thread name: loop}`` of every open persistent loop of this process."""
    with _all_lock:
        return {s.thread_name: s.loop for s in _all.values() if not s.closed}


def _forget(state: _ThreadLoop) -> None:
    with _all_lock:
        if state.thread_ident is not None and _all.get(state.thread_ident) is state:
            del _all[state.thread_ident]


def _thread_ended(state: _ThreadLoop) -> None:
    """The owning thread has ended (or dropped its thread-local): close its loop.

    In a forked child this runs as the interpreter drops the parent's other
    threads, before any at-fork hook: the loop is then the parent's, kept and
    never closed from here.
    """
    _forget(state)
    if state.pid != os.getpid():
        retire_inherited_loop(state.loop)
        return
    try:
        state.close(timeout=0)
    except Exception:  # a finaliser must not raise
        logger.debug("neopool: closing the loop of ended thread %s failed", state.thread_name)


def _run_cancelling_on_interrupt(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> T:
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        # Raised out of the loop by a signal handler (soft time limit, Ctrl-C)
        # while the task was suspended: cancel it and let it clean up here.
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        raise


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """What ``asyncio.run`` does at the end, for a loop that is not running."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())  # closes the loop's pool
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


@atexit.register
def _close_at_exit() -> None:
    close_all_loops(timeout=5.0)


def _after_fork_in_child() -> None:
    """Forget the parent's loops without closing them (see _orphans)."""
    global _all_lock
    _all_lock = threading.Lock()
    states = list(_all.values())
    _all.clear()
    for state in states:
        retire_inherited_loop(state.loop)  # never close it here: see _orphans
        state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
