"""Long-lived event loops, so pools are reused from one call to the next.

``asyncio.run`` makes a new loop on every call: a Celery task that uses it opens
a new driver (TCP, Bolt handshake, authentication) every time, because neopool
keeps one driver per loop. :func:`run` instead runs each call on a loop that
outlives it, so the second call borrows from the driver the first one opened.
There are two ways to do that, chosen per process:

* **a loop per thread** (the default): each thread that calls :func:`run` gets
  its own loop, run by that thread, for the life of the thread;
* **one loop per process** (:func:`use_process_loop`): one loop runs on a
  thread of its own (:data:`PROCESS_LOOP_THREAD`) and every thread's call is
  submitted to it and waited for, so calls from many threads run on it at once,
  sharing one pool and one driver. Libraries that keep process-wide asyncio
  objects (LightRAG's locks bind to the first loop that waits on them) need
  this: they cannot be used from two loops.

Each call still has ``asyncio.run``'s semantics, in both modes: tasks the call
spawned and left running are cancelled and awaited before it returns (the
loops' task factory notes which call spawned each task, so on the shared loop a
call's end touches only its own tasks). Only the loop, its pool and its driver
live on. Calls in flight can be counted, waited for and cancelled
(:func:`calls_in_flight`, :func:`wait_for_calls`, :func:`cancel_calls`): Celery's
warm shutdown gives tasks a deadline with them.

The runner owns these loops; nothing else runs or closes them. Each is an
:class:`asyncio.Runner`, closed the way ``asyncio.run`` closes its loop
(remaining tasks cancelled, async generators shut down, which closes the loop's
pool gracefully, default executor joined), always within a deadline:

* a thread's loop on :func:`close_thread_loop`, called from that thread, and
  when the thread ends;
* the process loop on :func:`close_process_loop` (calls still in flight are
  cancelled: it is shared, so there is no "after the current call");
* all of them by :func:`close_all_loops` (neopool.celery calls it at worker
  shutdown) and at interpreter exit. A thread's loop busy at that moment is
  closed by its own thread as soon as the call it is running returns.

After ``fork`` the child forgets the parent's loops without closing them
(closing a copied loop would unregister descriptors from the epoll instance the
child shares with its parent). The process loop's thread does not exist in the
child: its first call starts a loop of its own.

Both kinds of loop move through one state machine (:class:`LoopState`), every
move made by :func:`_move` for one of the :class:`Route` s by which a loop ends
(``docs/architecture.md`` lists them in one table); the module's state is one
object, :data:`_rt`, reset in one place after fork.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import enum
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

from neopool import _fork, _signal_wakeup, blocked_loop, registry
from neopool._ending_thread import run_off_ending_thread
from neopool._release import keep_inherited_loop
from neopool.config import DEFAULT_CLOSE_TIMEOUT
from neopool.errors import CallCancelled, LoopAlreadyRunning, NeopoolError

if sys.version_info >= (3, 11):
    from asyncio import Runner
else:  # pragma: no cover - exercised on 3.10 only
    from backports.asyncio.runner import Runner

logger = logging.getLogger("neopool")

__all__ = [
    "PROCESS_LOOP_THREAD",
    "calls_in_flight",
    "cancel_calls",
    "close_all_loops",
    "close_process_loop",
    "close_thread_loop",
    "deliver_interrupts",
    "detached",
    "loop_mode",
    "loops",
    "process_loop",
    "run",
    "thread_loop",
    "use_process_loop",
    "wait_for_calls",
]

_T = TypeVar("_T")


class _Runner(Protocol):
    """What neopool uses of :class:`asyncio.Runner` (or its backport on 3.10): it makes
    and closes the loop (calls are run on the loop itself, see :meth:`_ThreadLoop.run`)."""

    def close(self) -> None: ...

    def get_loop(self) -> asyncio.AbstractEventLoop: ...


#: Seconds the process loop's thread may take to start running it.
START_TIMEOUT = 5.0
#: Seconds the tasks a call left behind get to finish after being cancelled.
LEFTOVER_TIMEOUT = 5.0

#: Name of the thread that runs the process loop (see :func:`use_process_loop`).
PROCESS_LOOP_THREAD = "neopool-process-loop"

# -- how a loop ends: one machine for both kinds of loop -----------------------------------


class LoopState(enum.Enum):
    """Where a runner loop is on its way to its end.

    An open thread's loop is idle or runs one call at a time: its lock, held by
    whoever runs or closes it, tells which. The process loop runs until its close.
    """

    OPEN = "open"
    #: A close found it busy: whoever holds it closes it as soon as it is done with it.
    CLOSE_REQUESTED = "close requested"
    CLOSING = "closing"
    CLOSED = "closed"
    #: The parent's, in a forked child: forgotten and kept, never run or closed here.
    INHERITED = "inherited through fork"


class Route(enum.Enum):
    """Every way a runner loop comes to its end (``docs/architecture.md`` lists them in one
    table, which a test checks against this and :data:`MOVES`)."""

    CLOSE_THREAD_LOOP = "close_thread_loop()"
    CLOSE_THREAD_LOOP_IN_CALL = "close_thread_loop() inside a call on that loop"
    CLOSE_ALL_LOOPS = "close_all_loops()"
    EXIT = "interpreter exit"
    THREAD_END = "the loop's thread ends"
    AFTER_CALL = "its holder is done with it, after a close found it busy"
    CLOSE_PROCESS_LOOP = "close_process_loop()"
    LOOP_STOPPED = "code on the process loop stops it (loop.stop())"
    LOOP_RAISED = "SystemExit or KeyboardInterrupt raised out of the process loop"
    FORK = "fork, in the child"


#: Every move a runner loop makes, ``(from, to)``; :func:`_move` makes no other.
MOVES: frozenset[tuple[LoopState, LoopState]] = frozenset(
    {
        (LoopState.OPEN, LoopState.CLOSE_REQUESTED),
        (LoopState.OPEN, LoopState.CLOSING),
        (LoopState.CLOSE_REQUESTED, LoopState.CLOSING),
        (LoopState.CLOSING, LoopState.CLOSED),
        (LoopState.OPEN, LoopState.INHERITED),
        (LoopState.CLOSE_REQUESTED, LoopState.INHERITED),
        (LoopState.CLOSING, LoopState.INHERITED),
    }
)


class _Stateful(Protocol):
    _state: LoopState
    pid: int

    @property
    def state(self) -> LoopState: ...


def _move(loop: _Stateful, to: LoopState, route: Route) -> bool:
    """The one place a runner loop changes state: whether it moved (a move :data:`MOVES`
    does not have, such as closing a closed or inherited loop, changes nothing).

    ``route`` says why; a debug log records each move. In a forked child, an
    inherited loop (its ``pid`` the parent's) moves only to ``INHERITED``.
    """
    if (loop._state, to) not in MOVES:
        return False
    if to is not LoopState.INHERITED and loop.pid != os.getpid():
        return False
    loop._state = to
    logger.debug("neopool: runner loop %r: %s (%s)", loop, to.value, route.value)
    return True


#: The call (of :func:`run`) whose code is running, for the tasks it spawns.
_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "neopool_current_call", default=None
)


class _Call:
    """One :func:`run` call: its loop, its main task, the tasks its code spawned."""

    __slots__ = (
        "cancel_reason",
        "cancel_requested",
        "deadline",
        "exit",
        "future",
        "given_up",
        "interrupt_handler",
        "loop",
        "main",
        "prune_at",
        "returned",
        "tasks",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: concurrent.futures.Future[Any] | None = None,
    ) -> None:
        #: The tasks its code spawned that may still run: a list, pruned of finished
        #: ones as it doubles (see :func:`_task_factory`); cheaper than a WeakSet.
        self.tasks: list[asyncio.Task[Any]] = []
        #: The length at which :attr:`tasks` is next pruned.
        self.prune_at = _PRUNE_FROM
        self.loop = loop
        #: The task running the call's coroutine, once it has started.
        self.main: asyncio.Task[Any] | None = None
        #: Set when the call is cancelled from outside: what the caller is told.
        self.cancel_reason: str | None = None
        self.cancel_requested = False
        #: Set once the call's coroutine has returned: it is done, whatever comes after.
        self.returned = False
        #: Where a call on the process loop delivers its outcome to the waiting thread.
        self.future = future
        #: SystemExit or KeyboardInterrupt its coroutine raised on the process loop,
        #: delivered to the caller once what the call spawned has ended.
        self.exit: BaseException | None = None
        #: Set by :func:`deliver_interrupts`: takes a signal's exception on the loop.
        self.interrupt_handler: Callable[[Exception], None] | None = None
        #: Once a signal interrupted the call: the loop time by which it has ended, what
        #: it spawned included (``2 x LEFTOVER_TIMEOUT`` from the first signal).
        self.deadline: float | None = None
        #: Set by :meth:`give_up`: what the caller got while the coroutine still ran.
        self.given_up: BaseException | None = None

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the call's coroutine, from any thread (before it starts, too)."""
        if reason is not None and self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel_requested = True
        with contextlib.suppress(RuntimeError):  # its loop has closed: nothing runs
            self.loop.call_soon_threadsafe(self._cancel_main)

    def _cancel_main(self) -> None:
        if self.main is not None and not self.main.done() and not self.returned:
            self.main.cancel(self.cancel_reason)

    def interrupt(self, exc: BaseException) -> bool:
        """A signal handler raised ``exc`` while the caller waited: on the loop's thread
        with the loop idle, or from the waiting thread (then it happens on the loop).

        An ``Exception`` goes to the call's interrupt handler if it has one (its outcome
        is then the coroutine's); anything else, or without a handler, cancels the
        coroutine. Whether the handler took it.
        """
        handler = self.interrupt_handler
        if handler is None or not isinstance(exc, Exception):
            self.cancel()
            return False
        with contextlib.suppress(RuntimeError):  # its loop has closed: nothing runs
            self.loop.call_soon_threadsafe(self._hand_over, handler, exc)
        return True

    def _hand_over(self, handler: Callable[[Exception], None], exc: Exception) -> None:
        if self.main is not None and not self.main.done() and not self.returned:
            handler(exc)

    @property
    def caller_gone(self) -> bool:
        """Whether the caller has its outcome while the coroutine may still run: given up
        on, or ended by a signal while the coroutine ignored its cancel (and so nobody
        reads what the coroutine ends with)."""
        return self.given_up is not None or self not in _rt.calls

    def give_up(self, outcome: BaseException) -> None:
        """On the call's loop: end the call with ``outcome`` now, its coroutine still running.

        For code that told the coroutine to end (cancelled it) and saw it ignore that:
        the caller is not held any longer. On a thread's loop the loop stops, and the
        call's end treats the coroutine's task as one it left running (cancelled and
        awaited within ``LEFTOVER_TIMEOUT``, then left with a warning); on the process
        loop the waiting thread gets ``outcome`` at once, and the call is no longer in
        flight. Once per call.
        """
        main = self.main
        if self.caller_gone or main is None or main.done():
            return  # its caller has its outcome already
        self.given_up = outcome
        if self.future is None:
            self.loop.stop()  # run_until_complete() raises in _ThreadLoop.run
            return
        _rt.calls.discard(self)  # no caller waits for it: not in flight any more
        logger.warning(
            "neopool: task %r of a neopool.run() call ignored cancellation; its caller gets "
            "%s, and it is left running on the process loop",
            main,
            type(outcome).__name__,
        )
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_exception(outcome)
        # As on a thread's loop: cancelled once more, and what it spawned with it.
        main.cancel()
        asyncio.Task(_cancel_leftovers(self), loop=self.loop)

    def cancelled_error(self) -> BaseException:
        """What the caller gets when the call's coroutine was cancelled."""
        if self.cancel_reason is not None:
            return CallCancelled(f"neopool.run() call cancelled: {self.cancel_reason}")
        return asyncio.CancelledError()


class _Runtime:
    """The runner's state in this process, in one object; a forked child resets it in one
    place (:meth:`after_fork_in_child`). It is also the registry's
    :class:`~neopool.registry.LoopHost`."""

    __slots__ = (
        "calls",
        "process",
        "process_lock",
        "process_mode",
        "threads",
        "threads_lock",
    )

    def __init__(self) -> None:
        #: Whether :func:`run` uses the process loop (see :func:`use_process_loop`);
        #: kept across fork.
        self.process_mode = False
        self._start_empty()

    def _start_empty(self) -> None:
        #: Every thread's loop in this process, by the thread that owns it.
        self.threads: dict[int, _ThreadLoop] = {}
        self.threads_lock = threading.Lock()
        #: The process loop of this process, once started.
        self.process: _ProcessLoop | None = None
        self.process_lock = threading.Lock()
        #: Calls in flight on every runner loop of this process. No lock: adding and
        #: discarding are each one step under the GIL, and readers copy it in one step
        #: (``list``); only a shutdown waits for none, by looking again.
        self.calls: set[_Call] = set()

    def after_fork_in_child(self) -> None:
        """Forget the parent's loops without closing them (see the module's docstring).

        The process loop's thread did not come along: the child's first call in
        process-loop mode starts a loop of its own. The parent's calls in flight are
        not the child's to wait for or cancel.
        """
        inherited: list[_ThreadLoop | _ProcessLoop] = list(self.threads.values())
        if self.process is not None:
            inherited.append(self.process)
        self._start_empty()
        # The loops first: a call here trusts their state (see _thread_loop()).
        for state in inherited:
            _move(state, LoopState.INHERITED, Route.FORK)
            keep_inherited_loop(state.loop)
            if isinstance(state, _ThreadLoop):
                state.lock = threading.Lock()
        _signal_wakeup.after_fork_in_child()

    # -- as the registry's LoopHost
    def owns(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``loop`` is one of the runner's loops (a thread's or the process loop)."""
        process = self.process
        return (process is not None and process.loop is loop) or _state_of(loop) is not None

    def run_on_idle_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Callable[[], Coroutine[Any, Any, None]],
        timeout: float,
    ) -> concurrent.futures.Future[None] | None:
        return _run_on_idle_loop(loop, work, timeout)


_rt = _Runtime()
#: Seconds between looks of :func:`wait_for_calls`.
_WAIT_INTERVAL = 0.02


#: A call's list of spawned tasks is first pruned at this length.
_PRUNE_FROM = 64


def _task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    """Create tasks as usual, and note each under the call whose code spawned it.

    The list is pruned of finished tasks whenever it has doubled since (amortised
    O(1) per task): it holds the call's running tasks and a bounded number of
    finished ones, however many a long call spawns.
    """
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
    call = _current_call.get()
    if call is not None:
        tasks = call.tasks
        tasks.append(task)
        if len(tasks) >= call.prune_at:
            tasks[:] = [t for t in tasks if not t.done()]
            call.prune_at = max(_PRUNE_FROM, 2 * len(tasks))
    return task


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()  # the policy's loop: uvloop where it is installed
    loop.set_task_factory(_task_factory)  # type: ignore[arg-type]
    return loop


class _ThreadLoop:
    """One thread's loop. Its lock is held by whoever runs or closes it (running and
    closing are exclusive); its state says how far it is on its way to its end."""

    def __init__(self, thread: threading.Thread) -> None:
        self.runner: _Runner = Runner(loop_factory=_new_loop)
        self.loop: asyncio.AbstractEventLoop = self.runner.get_loop()
        # In the main thread, a signal wakes the loop as it waits (its handler then
        # raises there, at once): set up once, for the loop's life; re-armed per call.
        self.watched = _signal_wakeup.watch(self.loop)
        self.thread_name = thread.name
        self.thread_ident = thread.ident
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self._state = LoopState.OPEN
        #: The deadline the close asked while the loop was busy gave.
        self.close_timeout = DEFAULT_CLOSE_TIMEOUT

    def __repr__(self) -> str:
        return f"<thread loop of {self.thread_name}>"

    @property
    def state(self) -> LoopState:
        # Inherited as soon as the process is a forked child, before the fork hook
        # runs: the interpreter may drop the parent's threads (and run their loops'
        # finalisers) first.
        return LoopState.INHERITED if self.pid != os.getpid() else self._state

    @property
    def closed(self) -> bool:
        return self._state is LoopState.CLOSED or bool(self.loop.is_closed())

    def request_close(self, timeout: float, route: Route) -> None:
        """A close found the loop busy: whoever holds it closes it, within ``timeout``, as
        soon as it is done (a thread cannot wait for its own loop)."""
        self.close_timeout = timeout
        _move(self, LoopState.CLOSE_REQUESTED, route)

    def close_if_requested(self) -> None:
        """Whoever holds the lock and is done with the loop: close it if a close was asked."""
        if self._state is LoopState.CLOSE_REQUESTED:
            self.close_locked(self.close_timeout, Route.AFTER_CALL)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run one call (the caller holds :attr:`lock`).

        The call's task is the coroutine's own, made here in the caller's thread with
        the call marked in the caller's context for that moment: the task runs in a
        copy of it (each call a context of its own, which the tasks it spawns copy),
        and the caller's context is left as it was. No wrapping coroutine: each of
        the coroutine's steps would pass through it. The loop runs the task with
        ``run_until_complete``; then what it spawned and left running is cancelled
        (:func:`_end_leftovers`). Not ``Runner.run``: in the main thread it swaps the
        SIGINT handler in and out on every call, more than half of a call's own cost.
        Ctrl-C needs no handler of its own here: a ``KeyboardInterrupt`` raised out of
        the loop cancels the call's coroutine and runs it to its end before it
        propagates, as any signal's exception does below.
        """
        loop = self.loop
        if self.watched:  # the wakeup fd may have been cleared since the last call
            _signal_wakeup.rearm()
        call = _Call(loop)
        marked = _current_call.set(call)
        try:
            # Not through the loop's task factory: nothing spawns this task in a call.
            task: asyncio.Task[_T] = asyncio.Task(coro, loop=loop)
        finally:
            _current_call.reset(marked)
        call.main = task
        _rt.calls.add(call)
        try:
            try:
                result = loop.run_until_complete(task)
                if call.given_up is not None:  # given up on as it returned: its stop is queued
                    _run_queued_stop(loop)
                return result
            except asyncio.CancelledError as exc:
                if call.cancel_reason is not None:
                    raise call.cancelled_error() from exc
                raise
            except BaseException as exc:
                # Raised out of the loop by a signal handler (soft time limit, Ctrl-C)
                # while the call was suspended (or before its coroutine started): the
                # coroutine takes it or is cancelled, and is run here until it has
                # finished, within 2 x LEFTOVER_TIMEOUT.
                if loop.is_closed():
                    raise
                if call.given_up is not None and not task.done():  # the loop was stopped
                    call.tasks.append(task)  # ended below as what it spawned would be
                    raise call.given_up from None
                if task.done():  # raised as the task ended: its stop is still queued
                    _run_queued_stop(loop)
                    raise
                taken = call.interrupt(exc)
                _finish_within(loop, task, _time_left(call))
                if taken and task.done() and not task.cancelled():
                    return task.result()
                if not task.done():
                    # Thrown into the coroutine, its traceback holds the coroutine's frames:
                    # a caller clearing them (Celery does) would close the coroutine left running.
                    raise exc.with_traceback(None)  # noqa: B904 (the same exception)
                raise
            finally:
                # Most calls spawn none; a call that ignored its cancellation is left
                # running, and what it spawned with it (unless it was given up on).
                if call.tasks and (task.done() or call.given_up is not None):
                    _end_leftovers(call)
        finally:
            _rt.calls.discard(call)

    def close(self, timeout: float, route: Route) -> bool:
        """Close the loop within ``timeout``; ``False`` if it stayed busy that long."""
        timeout = _bounded(timeout)
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            self.request_close(timeout, route)
            # Whoever held it may have let go before the request was made: look again.
            if not self.lock.acquire(blocking=False):
                return False
        try:
            self.close_locked(deadline - time.monotonic(), route)
            return True
        finally:
            self.lock.release()

    def close_locked(self, timeout: float, route: Route) -> None:
        """Close as ``asyncio.run`` would, cut short at ``timeout`` (the caller holds the lock)."""
        if not _move(self, LoopState.CLOSING, route):
            return  # closed already, or the parent's
        try:
            _close_runner(self.runner, self.loop, timeout, self.thread_name)
        finally:
            _move(self, LoopState.CLOSED, route)
            if self.thread_ident == threading.get_ident():  # the main thread's wakeup: undone
                _signal_wakeup.release(self.loop)


def _finish_within(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], timeout: float
) -> None:
    """Run the idle ``loop`` until ``task`` is done, or ``timeout`` s have passed (then it
    is left running, with a warning: a coroutine may swallow its cancellation)."""
    stop = loop.call_later(timeout, loop.stop)
    try:
        with contextlib.suppress(BaseException):  # its outcome is read by the caller
            loop.run_until_complete(task)
    finally:
        stop.cancel()
    if not task.done():
        logger.warning(
            "neopool: a neopool.run() call interrupted by %s did not finish within %.0f s "
            "(it ignored cancellation); left running on its loop",
            "a signal",
            timeout,
        )


def _bounded(timeout: float) -> float:
    """A timeout the thread primitives accept: negative and NaN as 0, infinity capped."""
    return min(max(0.0, timeout), threading.TIMEOUT_MAX)


def _close_runner(
    runner: _Runner, loop: asyncio.AbstractEventLoop, timeout: float, name: str
) -> None:
    """Close ``runner`` as ``asyncio.run`` would, cut short at ``timeout``, in the calling thread.

    When time runs out the loop is stopped and closed as it is; its pool then
    has its sockets released by the registry.
    """
    if loop.is_closed():
        return
    timeout = _bounded(timeout)
    stop = loop.call_later(timeout, loop.stop)
    try:
        runner.close()
    except RuntimeError as exc:  # stopped at the deadline, or the interpreter is ending
        logger.warning(
            "neopool: closing the event loop of thread %s did not finish within "
            "%.1f s (%s); closed it as it was",
            name,
            timeout,
            exc,
        )
    finally:
        stop.cancel()
        _sweep_pools()


def _end_leftovers(call: _Call) -> None:
    """After a call on a thread's loop: cancel and await what its coroutine spawned and
    left running, on the idle loop, before the call's outcome is given.

    A signal handler raising meanwhile (the coroutine has ended, its outcome stands):
    the cancelling is finished within ``2 x LEFTOVER_TIMEOUT``; an exception the call's
    interrupt handler would take is dropped, anything else propagates.
    """
    loop = call.loop
    for task in call.tasks:  # the driver's own tasks (one per query) have ended by now
        if not task.done():
            break
    else:
        return
    if loop.is_closed():
        return
    ending = asyncio.Task(_cancel_leftovers(call, call.deadline), loop=loop)
    try:
        loop.run_until_complete(ending)
    except BaseException as exc:
        if loop.is_closed():
            raise
        if ending.done():  # raised as the cleanup ended: its stop is still queued
            _run_queued_stop(loop)
        else:
            _finish_within(loop, ending, _time_left(call))
        if call.interrupt_handler is None or not isinstance(exc, Exception):
            raise


def _time_left(call: _Call) -> float:
    """Seconds an interrupted call has left to end: ``2 x LEFTOVER_TIMEOUT`` from the first
    signal, for the coroutine and what it spawned together, however many signals come."""
    now = call.loop.time()
    if call.deadline is None:
        call.deadline = now + 2 * LEFTOVER_TIMEOUT
    return max(0.0, call.deadline - now)


def _run_queued_stop(loop: asyncio.AbstractEventLoop) -> None:
    """A signal's exception came out of ``run_until_complete`` as its future ended: the
    stop the future's callback queued is run now (one loop iteration), or it would end
    the loop's next run at once ("Event loop stopped before Future completed")."""
    loop.call_soon(loop.stop)
    with contextlib.suppress(BaseException):  # a second signal: the caller raises the first
        loop.run_forever()


async def _as_call(coro: Coroutine[Any, Any, _T], call: _Call) -> _T:
    """On the process loop: run ``coro``; then cancel and await what it spawned and left
    running (a call there is one task, as the loop is shared and never idle)."""
    me = asyncio.current_task()
    assert me is not None
    call.main = me
    # The one place the call is marked: in its task's own context (a copy of its
    # caller's), which the tasks it spawns copy.
    _current_call.set(call)
    try:
        if call.cancel_requested:  # cancelled before it could start
            coro.close()
            raise asyncio.CancelledError(call.cancel_reason)
        try:
            return await coro
        except (SystemExit, KeyboardInterrupt) as exc:
            if call.future is None:
                raise
            # On the shared process loop, asyncio would stop the loop for every call:
            # this one ends with it, the others go on.
            call.exit = exc
            raise asyncio.CancelledError(f"the call raised {type(exc).__name__}") from None
        finally:
            # Its coroutine has ended, returning or raising: a cancel arriving now
            # (a shutdown's deadline) must not replace that outcome.
            call.returned = True
    finally:
        if call.tasks:  # most calls spawn none, or only tasks that have ended
            await _cancel_leftovers(call)


async def _cancel_leftovers(call: _Call, deadline: float | None = None) -> None:
    """Cancel and await the tasks the call spawned, and those they spawn while being
    cancelled, until none are left or ``LEFTOVER_TIMEOUT`` s have passed in all (or the
    loop time ``deadline``, if sooner)."""
    leftovers = [task for task in call.tasks if not task.done()]
    if not leftovers:
        return
    loop = call.loop
    started = loop.time()
    deadline = min(started + LEFTOVER_TIMEOUT, deadline or float("inf"))
    cancelled: set[asyncio.Task[Any]] = set()
    while True:
        for task in leftovers:
            if task not in cancelled:
                cancelled.add(task)
                task.cancel()
        # The call's coroutine has ended, and its outcome stands: a cancel from outside
        # now (a signal, its loop closing) does not replace it. The wait is shielded
        # from it; only a closing loop, which cancels every task (this wait too, and
        # then awaits them all itself), ends it early.
        left = max(0.0, deadline - loop.time())
        # Not through the loop's task factory: the wait is none of the call's tasks.
        waiting = asyncio.Task(asyncio.wait(leftovers, timeout=left), loop=loop)
        while True:
            try:
                await asyncio.shield(waiting)
                break
            except asyncio.CancelledError:
                if waiting.cancelled():
                    return
        # A leftover may have spawned more as it was cancelled (in its finally).
        leftovers = [task for task in call.tasks if not task.done()]
        if not leftovers:
            return
        if loop.time() >= deadline:
            break
    for task in leftovers:
        logger.warning(
            "neopool: task %r, left running by a neopool.run() call, ignored cancellation "
            "for %.1f s; left running",
            task,
            loop.time() - started,
        )


def deliver_interrupts(handler: Callable[[Exception], None]) -> None:
    """In a :func:`run` call: give ``handler`` what a signal handler raises while the call
    waits, instead of cancelling the call's coroutine.

    Under Celery's prefork pool a soft time limit is such an exception, raised out of
    the loop (or out of the waiting thread, in process-loop mode). ``handler`` is
    called on the call's loop, with the loop idle between steps; it delivers the
    exception into the coroutine (see ``neopool.celery.task``), and the call's
    outcome is then the coroutine's, within ``2 x LEFTOVER_TIMEOUT``.
    ``KeyboardInterrupt`` and ``SystemExit`` still cancel the coroutine.
    """
    call = _current_call.get()
    if call is None:
        raise RuntimeError("deliver_interrupts() is for code that a neopool.run() call runs")
    call.interrupt_handler = handler


def _this_call() -> _Call:
    """The :func:`run` call whose code runs here: for code that may have to end it
    without its coroutine (AsyncTask: :meth:`_Call.give_up`, :attr:`_Call.caller_gone`)."""
    call = _current_call.get()
    if call is None:
        raise RuntimeError("_this_call() is for code that a neopool.run() call runs")
    return call


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Tasks spawned inside this block outlive the :func:`run` call (the one opt-out).

    By default a call cancels and awaits the tasks it spawned and left running,
    as ``asyncio.run`` does. Spawned inside ``with detached():`` (directly or by
    the tasks spawned there), tasks belong to the loop instead: they keep running
    across calls until they end, or until the loop closes (worker shutdown,
    :func:`close_thread_loop`), which cancels them. Use it for an object kept
    from call to call whose background tasks should live as long as it does,
    e.g. a LightRAG instance per workspace held for the worker's life.
    """
    token = _current_call.set(None)
    try:
        yield
    finally:
        _current_call.reset(token)


class _Holder:
    """Lives in the thread-local; its finaliser closes the loop when the thread ends."""

    __slots__ = ("__weakref__", "finalizer", "state")

    def __init__(self, state: _ThreadLoop) -> None:
        self.state = state
        #: Closes the loop when the thread ends; :func:`close_thread_loop` detaches it
        #: (an explicit close replaces that one, and must not wait for it).
        self.finalizer = weakref.finalize(self, _thread_ended, state)
        self.finalizer.atexit = False


#: Each thread's :class:`_Holder` (kept across fork: a child's holder is of an inherited loop).
_local = threading.local()


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a persistent event loop.

    By default that is this thread's loop: created on the first call in a
    thread and reused by every later call there, with its neopool pool and
    driver. After :func:`use_process_loop`, it is the process loop: the
    coroutine is submitted to it and this thread waits, so calls from many
    threads run on the one loop at once. As with ``asyncio.run``, tasks the
    coroutine spawned and left running are cancelled and awaited before this
    returns. If the call is interrupted (a Celery soft time limit,
    ``KeyboardInterrupt``), the coroutine is cancelled (or given the exception, see
    :func:`deliver_interrupts`) and run until it has finished, at most
    ``2 x LEFTOVER_TIMEOUT`` seconds, so leases it holds are returned before the
    exception propagates.

    Raises :class:`LoopAlreadyRunning` when called from async code: ``await``
    the coroutine there instead; :class:`CallCancelled` when the call was
    cancelled from outside (:func:`cancel_calls`, its loop closed).
    """
    if not asyncio.iscoroutine(coro):
        raise TypeError(f"neopool.run() takes a coroutine, not {type(coro).__name__}")
    if asyncio._get_running_loop() is not None:  # no exception raised and caught per call
        coro.close()
        raise LoopAlreadyRunning(
            "neopool.run() was called while an event loop is running in this thread; "
            "it blocks until the coroutine finishes, which would stall that loop. "
            "Await the coroutine instead."
        )
    if _rt.process_mode:
        return _run_on_process_loop(coro)
    while True:
        state = _thread_loop()
        with state.lock:
            if state._state is not LoopState.OPEN:  # moved since _thread_loop() looked
                state.close_if_requested()  # asked while it ran something other than run()
                if state.closed:  # closed by close_all_loops() since: start a new one
                    continue
            try:
                return state.run(coro)
            finally:
                state.close_if_requested()  # asked during the call


# -- the process loop -------------------------------------------------------------------


class _ProcessLoop:
    """The one loop of the process: an :class:`asyncio.Runner` run by a thread of its own.

    The thread runs the loop until :meth:`close` stops it, then closes the
    runner itself (in the thread that ran the loop), within the close's deadline.
    """

    def __init__(self) -> None:
        self.runner: _Runner = Runner(loop_factory=_new_loop)
        self.loop: asyncio.AbstractEventLoop = self.runner.get_loop()
        self.pid = os.getpid()
        self._state = LoopState.OPEN
        #: The route by which its end came, once it has.
        self.ending: Route | None = None
        #: When the thread cuts its close short: a little before the closer's own deadline.
        self.deadline: float | None = None
        #: Set by its thread once the loop is closed (what a close waits for).
        self.finished = threading.Event()
        running = threading.Event()
        self.loop.call_soon(running.set)
        # A daemon: interpreter exit does not wait for it (the atexit hook closes it).
        self.thread = threading.Thread(target=self._serve, name=PROCESS_LOOP_THREAD, daemon=True)
        self.thread.start()
        if not running.wait(START_TIMEOUT):
            raise NeopoolError(f"the process loop did not start within {START_TIMEOUT:g}s")
        # Warns when a call blocks the loop; ends with the loop, holds it only weakly.
        blocked_loop.watch(self.loop, self.thread)

    def __repr__(self) -> str:
        return "<the process loop>"

    @property
    def state(self) -> LoopState:
        return LoopState.INHERITED if self.pid != os.getpid() else self._state

    @property
    def usable(self) -> bool:
        return self.state is LoopState.OPEN and not self.loop.is_closed()

    def _serve(self) -> None:
        route = Route.LOOP_STOPPED
        try:
            try:
                self.loop.run_forever()
                route, reason = (
                    Route.LOOP_STOPPED,
                    "the process loop was stopped by code running on it (loop.stop())",
                )
            except BaseException as exc:  # a task raised SystemExit or KeyboardInterrupt
                # asyncio stops the loop for it. Every call in flight ends with the loop,
                # and its caller is told why; here, in the loop's thread, it ends.
                route, reason = (
                    Route.LOOP_RAISED,
                    f"the process loop stopped: a task raised {exc!r}",
                )
            if _move(self, LoopState.CLOSING, route):  # else a close stopped it
                self.ending = route
                logger.warning("neopool: %s; calls in flight on it are cancelled", reason)
                for call in _calls_on(self.loop):
                    call.cancel_reason = call.cancel_reason or reason
        finally:
            deadline = self.deadline
            budget = DEFAULT_CLOSE_TIMEOUT if deadline is None else deadline - time.monotonic()
            try:
                _close_runner(self.runner, self.loop, max(0.0, budget), PROCESS_LOOP_THREAD)
            finally:
                _settle_stranded(self.loop)
                _move(self, LoopState.CLOSED, self.ending or route)
                self.finished.set()

    def close(self, timeout: float, route: Route, *, wait: bool = True) -> bool:
        """Stop the loop and let its thread close it within ``timeout``; whether it has.

        Calls still in flight are cancelled (their callers get :class:`CallCancelled`).
        Called on the loop's own thread (or with ``wait=False``), the close only
        begins: it happens as soon as the running callback returns (a close
        never waits for itself).
        """
        if _move(self, LoopState.CLOSING, route):
            self.ending = route
        timeout = _bounded(timeout)
        deadline = time.monotonic() + timeout
        # The thread stops a close that overruns a little early: cutting it short
        # (stopping and closing the loop as it is) takes time too, and must end
        # by the closer's deadline.
        self.deadline = deadline - min(_CUT_SHORT_MARGIN, _CUT_SHORT_SHARE * timeout)
        for call in _calls_on(self.loop):
            call.cancel_reason = call.cancel_reason or "the process loop was closed"
        with contextlib.suppress(RuntimeError):  # closed already
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not wait or threading.current_thread() is self.thread:
            return False
        # Not done by then: the thread finishes on its own, shortly after.
        return self.finished.wait(max(0.0, deadline - time.monotonic()))


#: Of a process loop close's time, what its thread keeps back for cutting the close
#: short if it overruns: at most this many seconds, and at most this share of it.
_CUT_SHORT_MARGIN = 0.25
_CUT_SHORT_SHARE = 0.1


def _calls_on(loop: asyncio.AbstractEventLoop) -> list[_Call]:
    return [call for call in list(_rt.calls) if call.loop is loop]


def _settle_stranded(loop: asyncio.AbstractEventLoop) -> None:
    """After ``loop`` closed: fail the calls submitted to it that never got to run."""
    for call in _calls_on(loop):
        if call.future is not None and not call.future.done():
            call.cancel_reason = call.cancel_reason or "the process loop was closed"
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                call.future.set_exception(call.cancelled_error())
        _rt.calls.discard(call)


def use_process_loop(enabled: bool = True) -> None:
    """Run every later :func:`run` call of this process on one process-wide loop.

    The loop starts on the first call, on a thread of its own
    (:data:`PROCESS_LOOP_THREAD`), and lives until :func:`close_process_loop`,
    :func:`close_all_loops` or interpreter exit; calls from every thread are
    submitted to it, and run on it concurrently, sharing its pool and driver.
    The setting survives ``fork``; the loop does not (the child starts its own).
    ``use_process_loop(False)`` goes back to a loop per thread for later calls;
    a process loop already started stays until it is closed.
    """
    _rt.process_mode = enabled


def loop_mode() -> str:
    """``"process"`` after :func:`use_process_loop`, else ``"thread"``."""
    return "process" if _rt.process_mode else "thread"


def process_loop() -> asyncio.AbstractEventLoop:
    """The process loop, started if it is not running yet."""
    return _the_process_loop().loop


def _the_process_loop() -> _ProcessLoop:
    state = _rt.process
    if state is not None and state.usable:
        return state
    with _rt.process_lock:
        state = _rt.process
        if state is None or not state.usable:
            state = _rt.process = _ProcessLoop()
        return state


def _run_on_process_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Submit ``coro`` to the process loop as one call and wait for its outcome."""
    while True:
        state = _the_process_loop()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        call = _Call(state.loop, future)
        context = contextvars.copy_context()  # each call a context of its own
        _rt.calls.add(call)  # before it is submitted: a close that misses it here settles it
        try:
            state.loop.call_soon_threadsafe(_start_call, state, call, coro, context=context)
        except RuntimeError:  # closed since: start a new one
            _rt.calls.discard(call)
            continue
        break
    try:
        _signal_wakeup.wait(future)  # in the main thread, woken by a signal too
        return future.result()
    except BaseException as exc:
        if future.done():
            raise
        # Interrupted while waiting (a signal handler raised: soft time limit, Ctrl-C):
        # the coroutine takes it or is cancelled, and returns its leases first.
        taken = call.interrupt(exc)
        with contextlib.suppress(BaseException):
            future.exception(timeout=2 * LEFTOVER_TIMEOUT)
        if taken and future.done() and not isinstance(future.exception(), asyncio.CancelledError):
            return future.result()
        raise


def _start_call(state: _ProcessLoop, call: _Call, coro: Coroutine[Any, Any, Any]) -> None:
    """On the process loop, in the call's context: start the call's main task.

    A call that arrives once the loop is closing never starts there: its caller
    is told it was cancelled, before any of its code ran.
    """
    if state.state is not LoopState.OPEN:
        coro.close()
        _rt.calls.discard(call)
        assert call.future is not None
        call.future.set_exception(CallCancelled("neopool.run() call: the process loop closed"))
        return
    # Not through the loop's task factory: nothing spawns this task in a call.
    task = asyncio.Task(_as_call(coro, call), loop=call.loop)
    task.add_done_callback(lambda done: _settle(call, done))


def _settle(call: _Call, task: asyncio.Task[Any]) -> None:
    """On the process loop: hand the call's outcome to the thread waiting for it."""
    future = call.future
    assert future is not None
    _rt.calls.discard(call)  # first: no longer in flight once its caller can have the outcome
    try:
        if call.exit is not None:
            future.set_exception(call.exit)
        elif task.cancelled():
            future.set_exception(call.cancelled_error())
        elif task.exception() is not None:
            future.set_exception(task.exception())
        else:
            future.set_result(task.result())
    except concurrent.futures.InvalidStateError:
        pass


def close_process_loop(timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
    """Close the process loop, if one runs, within ``timeout``; whether it is closed.

    Calls still in flight on it are cancelled and awaited (their callers get
    :class:`CallCancelled`), then the loop closes as ``asyncio.run`` would:
    its pool closes gracefully on it. Give calls time to finish first with
    :func:`wait_for_calls`. The next :func:`run` in process-loop mode starts a
    new loop.
    """
    deadline = time.monotonic() + _bounded(timeout)
    return _close_process_until(deadline, Route.CLOSE_PROCESS_LOOP) >= 0


def _close_process_until(deadline: float, route: Route, *, wait: bool = True) -> int:
    """Close the process loop by ``deadline``: 1 if closed here, 0 if none, -1 if not finished."""
    with _rt.process_lock:
        state, _rt.process = _rt.process, None
    _signal_wakeup.release()  # in the main thread, unless its own loop still reads it
    if state is None or state.state in (LoopState.INHERITED, LoopState.CLOSED):
        return 0
    return 1 if state.close(max(0.0, deadline - time.monotonic()), route, wait=wait) else -1


# -- calls in flight ----------------------------------------------------------------------


def calls_in_flight() -> int:
    """How many :func:`run` calls are running now, on every runner loop of this process."""
    return len(_rt.calls)


def wait_for_calls(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every :func:`run` call in flight to end; if they did."""
    deadline = time.monotonic() + _bounded(timeout)
    while calls_in_flight():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(_WAIT_INTERVAL, remaining))
    return True


def cancel_calls(reason: str = "cancelled by neopool.runner.cancel_calls()") -> int:
    """Cancel the coroutine of every :func:`run` call in flight; return how many.

    Each call then ends as a cancelled ``asyncio.run`` would (what it spawned
    is cancelled too, its ``async with`` blocks return their leases), and its
    caller gets :class:`CallCancelled` saying ``reason``. Celery's warm shutdown
    uses it once its deadline has passed.
    """
    calls = list(_rt.calls)
    for call in calls:
        call.cancel(reason)
    return len(calls)


# -- a loop per thread --------------------------------------------------------------------


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's persistent loop (created if needed), to tell it apart.

    Run coroutines on it with :func:`run`, which holds the loop for the call and
    closes it afterwards if a close came meanwhile.
    """
    return _thread_loop().loop


def _thread_loop() -> _ThreadLoop:
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is not None:
        # Its own state, not the property's process check: a call comes after the fork
        # hook, which has moved an inherited loop to INHERITED (and it costs a syscall).
        state = holder.state
        if state._state in _USABLE and not state.loop.is_closed():
            return state
    thread = threading.current_thread()
    state = _ThreadLoop(thread)
    _local.holder = _Holder(state)
    with _rt.threads_lock:
        assert state.thread_ident is not None
        _rt.threads[state.thread_ident] = state
    return state


#: A thread's loop in these states runs calls (one asked to close, after it closes).
_USABLE = (LoopState.OPEN, LoopState.CLOSE_REQUESTED)


def _state_of(loop: asyncio.AbstractEventLoop) -> _ThreadLoop | None:
    with _rt.threads_lock:
        return next((s for s in _rt.threads.values() if s.loop is loop), None)


def _run_on_idle_loop(
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
            try:
                state.close_if_requested()  # a close found the loop busy with this work
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
    thread starts a new loop. Called from code that the loop is running (inside
    this thread's :func:`run`), it returns at once: the loop closes as soon as
    that call returns, since a thread cannot wait for its own loop to be free.
    """
    holder: _Holder | None = getattr(_local, "holder", None)
    if holder is None:
        return
    state = holder.state
    if state.state is LoopState.INHERITED:  # the parent's, in a forked child: kept, never closed
        _let_go(holder)
        keep_inherited_loop(state.loop)
        return
    if _running_loop() is state.loop:
        # Running the code that asks: the loop stays this thread's (and the holder's,
        # whose finaliser closes it if the thread ends first) until the call returns;
        # then run() closes it, or the next run() does before it starts a new loop.
        state.request_close(timeout, Route.CLOSE_THREAD_LOOP_IN_CALL)
        return
    if state.close(timeout, Route.CLOSE_THREAD_LOOP):
        _let_go(holder)
    # Else a helper thread runs a pool's close on it: the loop stays this thread's,
    # and the helper closes it when done (it is asked to, see run_on_idle_loop).


def _let_go(holder: _Holder) -> None:
    """This thread's loop is closed or not its own: drop it, and its finaliser with it."""
    holder.finalizer.detach()  # not closed again, nor waited for, as the holder goes
    if getattr(_local, "holder", None) is holder:
        _local.holder = None
    _forget(holder.state)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running in the calling thread, if any."""
    return asyncio._get_running_loop()


def close_all_loops(timeout: float = DEFAULT_CLOSE_TIMEOUT) -> int:
    """Close every persistent loop of this process within ``timeout`` seconds in all.

    Idle thread loops are closed first, then the process loop (calls still in
    flight on it are cancelled; give them time first with :func:`wait_for_calls`),
    then busy thread loops as they become free. A thread's loop still busy at
    the deadline is closed by its own thread as soon as its current call
    returns. Works from async code too (the closing then happens on a helper
    thread, since a thread cannot run two loops; called on the process loop, its
    close begins but is not waited for). Returns how many loops were closed here.
    """
    timeout = _bounded(timeout)
    deadline = time.monotonic() + timeout
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _close_all_until(deadline, Route.CLOSE_ALL_LOOPS)
    process = _rt.process
    on_process_loop = process is not None and threading.current_thread() is process.thread
    # This thread's own loop runs this very call: it closes once the call returns.
    own = _state_of(asyncio.get_running_loop())
    if own is not None:
        own.request_close(timeout, Route.CLOSE_ALL_LOOPS)
    closer: concurrent.futures.Future[int] = concurrent.futures.Future()

    # The helper thread ends its work a little early, to report by the caller's deadline.
    inner = deadline - min(_CUT_SHORT_MARGIN, _CUT_SHORT_SHARE * max(0.0, timeout))

    def close_all() -> None:
        try:
            closer.set_result(
                _close_all_until(
                    inner, Route.CLOSE_ALL_LOOPS, wait_for_process=not on_process_loop, skip=own
                )
            )
        except BaseException as exc:
            closer.set_exception(exc)

    threading.Thread(target=close_all, name="neopool-close", daemon=True).start()
    try:
        return closer.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        return 0


def _close_all_until(
    deadline: float,
    route: Route,
    *,
    wait_for_busy: bool = True,
    wait_for_process: bool = True,
    skip: _ThreadLoop | None = None,
) -> int:
    with _rt.threads_lock:
        states = [state for state in _rt.threads.values() if state is not skip]
    closed = 0
    busy = []
    for state in states:
        if state.state is LoopState.INHERITED or state.closed:
            _forget(state)
        elif state.lock.acquire(blocking=False):
            closed += _close_and_release(state, deadline, route)
        else:
            busy.append(state)
    closed += max(0, _close_process_until(deadline, route, wait=wait_for_process))
    for state in busy:
        wait = max(0.0, deadline - time.monotonic()) if wait_for_busy else 0.0
        if state.lock.acquire(timeout=wait):
            closed += _close_and_release(state, deadline, route)
        else:
            state.request_close(DEFAULT_CLOSE_TIMEOUT, route)
            logger.warning(
                "neopool: the event loop of thread %s is busy; it closes when its "
                "current call returns",
                state.thread_name,
            )
    return closed


def _close_and_release(state: _ThreadLoop, deadline: float, route: Route) -> int:
    """Close a loop whose lock the caller took; 1 if it was open."""
    try:
        was_open = not state.closed
        state.close_locked(max(0.0, deadline - time.monotonic()), route)
        _forget(state)
        return int(was_open)
    finally:
        state.lock.release()


def loops() -> dict[str, asyncio.AbstractEventLoop]:
    """``{thread name: loop}`` of every open persistent loop of this process (the process
    loop under :data:`PROCESS_LOOP_THREAD`)."""
    with _rt.threads_lock:
        found = {s.thread_name: s.loop for s in _rt.threads.values() if not s.closed}
    process = _rt.process
    if process is not None and process.usable:
        found[PROCESS_LOOP_THREAD] = process.loop
    return found


def _forget(state: _ThreadLoop) -> None:
    with _rt.threads_lock:
        if state.thread_ident is not None and _rt.threads.get(state.thread_ident) is state:
            del _rt.threads[state.thread_ident]


def _thread_ended(state: _ThreadLoop) -> None:
    """The owning thread has ended (or dropped its thread-local): close its loop.

    In a forked child this can run as the interpreter drops the parent's other
    threads, before any at-fork hook: the loop is then the parent's, kept and
    never closed from here.
    """
    if state.state is LoopState.INHERITED:
        keep_inherited_loop(state.loop)
        return
    if state.closed:  # its holder was replaced after a close: nothing left to do
        _forget(state)
        return

    def close() -> None:
        try:
            if state.close(DEFAULT_CLOSE_TIMEOUT, Route.THREAD_END):
                _forget(state)
            # Else a helper thread holds it, and closes it when done (see _run_on_idle_loop).
        except BaseException:  # a finaliser must not raise
            logger.debug("neopool: closing the loop of ended thread %s failed", state.thread_name)

    run_off_ending_thread(close, state.thread_ident, DEFAULT_CLOSE_TIMEOUT + _CUT_SHORT_MARGIN)


def _sweep_pools() -> None:
    """Let the registry release pools of a loop that closed before they could."""
    registry.sweep()


@atexit.register
def _close_at_exit() -> None:
    """Close idle loops and the process loop at exit (its calls still in flight are
    cancelled); a thread's loop still running in a daemon thread is not waited for."""
    _close_all_until(time.monotonic() + DEFAULT_CLOSE_TIMEOUT, Route.EXIT, wait_for_busy=False)


registry.set_loop_host(_rt)
_fork.add_step(_fork.Step.LOOPS, _rt.after_fork_in_child)
