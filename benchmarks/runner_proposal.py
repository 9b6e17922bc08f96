"""A prototype of the proposed ``neopool.run`` call path (a loop per thread), to measure it.

``sync_caller.py --proposal`` runs it side by side with ``neopool.run``. It keeps
what a call guarantees: a context of its own, the tasks it spawned noted by the
loop's task factory and cancelled and awaited at its end, the call counted in
flight under a lock, the thread's loop held under a lock, and an exception
raised out of the loop (a signal: soft time limit, Ctrl-C) cancels the call
and runs it to its end before propagating. What it does not do, per call:

- ``asyncio.Runner.run``: in the main thread (prefork, solo) it swaps the SIGINT
  handler in and out (two ``signal.getsignal`` and two ``signal.signal``, each
  converting to an enum; for its ``functools.partial`` handler the conversion
  fails and formats a ``ValueError`` holding the task's repr). The call's task
  is made with ``loop.create_task(..., context=...)`` and run with
  ``loop.run_until_complete``; the Runner stays for closing the loop;
- a ``WeakSet`` for the spawned tasks: a list, pruned of finished tasks when it
  doubles, and looked at only when not empty;
- an exception to learn that no loop runs (``asyncio._get_running_loop()``).

Not for use: a measuring aid until ``neopool.runner`` does this itself (then delete it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "proposal_call", default=None
)
_calls: set[_Call] = set()
_calls_lock = threading.Lock()
LEFTOVER_TIMEOUT = 5.0


class _Call:
    __slots__ = ("main", "prune_at", "tasks")

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.main: asyncio.Task[Any] | None = None
        self.prune_at = 64


def _task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
    call = _current.get()
    if call is not None:
        tasks = call.tasks
        tasks.append(task)
        if len(tasks) >= call.prune_at:  # amortised O(1): only running ones are kept
            tasks[:] = [t for t in tasks if not t.done()]
            call.prune_at = max(64, 2 * len(tasks))
    return task


class _ThreadLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_task_factory(_task_factory)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.pid = os.getpid()


_local = threading.local()


def _thread_loop() -> _ThreadLoop:
    state: _ThreadLoop | None = getattr(_local, "state", None)
    if state is not None and not state.loop.is_closed() and state.pid == os.getpid():
        return state
    state = _local.state = _ThreadLoop()
    return state


async def _as_call(coro: Coroutine[Any, Any, T], call: _Call) -> T:
    call.main = asyncio.current_task()
    _current.set(call)
    try:
        return await coro
    finally:
        if call.tasks:
            leftovers = [t for t in call.tasks if t is not call.main and not t.done()]
            for task in leftovers:
                task.cancel()
            if leftovers:
                await asyncio.wait(leftovers, timeout=LEFTOVER_TIMEOUT)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``neopool.run`` as proposed (a loop per thread only)."""
    if not asyncio.iscoroutine(coro):
        raise TypeError(f"run() takes a coroutine, not {type(coro).__name__}")
    if asyncio._get_running_loop() is not None:
        coro.close()
        raise RuntimeError("run() was called while an event loop is running in this thread")
    state = _thread_loop()
    with state.lock:
        loop = state.loop
        call = _Call()
        context = contextvars.copy_context()
        with _calls_lock:
            _calls.add(call)
        try:
            task = context.run(loop.create_task, _as_call(coro, call))  # a context per call
            try:
                return loop.run_until_complete(task)
            except BaseException:
                if not task.done() and not loop.is_closed():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(task)
                raise
        finally:
            with _calls_lock:
                _calls.discard(call)


def close() -> None:
    """Close this thread's loop, its pools first (on it)."""
    from neopool import GlobalNeo4jConnectionPool

    state: _ThreadLoop | None = getattr(_local, "state", None)
    if state is not None and not state.loop.is_closed():
        state.loop.run_until_complete(GlobalNeo4jConnectionPool().close_all_pools())
        state.loop.close()
