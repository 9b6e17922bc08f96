"""``@app.task(base=AsyncTask) async def f(...)``: async tasks on a persistent loop.

Celery calls a task synchronously. ``asyncio.run`` inside it would make a new
loop, and so a new driver, on every task; :class:`AsyncTask` runs the
coroutine through :func:`neopool.run` instead: on the worker thread's
persistent loop, or, in process-loop mode (``setup(app, loop="process")``), on
the one loop of the worker process, where many tasks run at once. Either way
every task after the first borrows from a driver that is already connected,
and each task's call has ``asyncio.run``'s semantics: what the task spawned
and left running is cancelled when it ends, and only its own tasks.

A bound task (``bind=True``) sees its own ``self.request`` in its coroutine, and
so do the tasks the coroutine spawns: Celery keeps the request in a
thread-local, which the process loop's thread does not have, so AsyncTask
hands it to the coroutine in a context variable (each task's call has a context
of its own, so tasks running at once on one loop each see theirs).
``self.retry()``, ``self.request.retries`` and the headers work as in a sync task.
(Celery finds the parent of a task sent from the coroutine per thread too, so
on the process loop such a task gets no ``parent_id``.)

Cancellation cancels only that task's coroutine, and its ``async with`` blocks
return their leases before the task ends:

* a soft time limit: under the threads and solo pools, which have no time
  limits of their own, AsyncTask enforces it on the loop; under prefork Celery's
  signal comes while the loop waits (the runner hands it to the task) or in a
  plain loop callback (where asyncio would log it and go on; it is caught there).
  In every case ``SoftTimeLimitExceeded`` is thrown into the coroutine where it
  waits, as a sync task gets it wherever it is: Celery's pattern (``except
  SoftTimeLimitExceeded:`` clean up, return) works, and a task that returns
  succeeds; one that does not has ``LEFTOVER_TIMEOUT`` seconds before it is
  cancelled. The task otherwise fails with ``SoftTimeLimitExceeded``. (A hard
  time limit cannot stop a thread: under threads it is not enforced.)
* ``revoke(task_id, terminate=True, signal="SIGUSR1")`` under prefork does the same;
  the default ``SIGTERM`` kills the child, and the server sees its sockets close;
* under threads, where Celery cannot signal a thread, a revoked running task
  is noticed within ``revocation_poll`` seconds (plus 0.05) and its coroutine
  cancelled; the task then fails with ``TaskRevokedError``. (Under solo the worker hears
  no remote control while its one thread runs a task, so a revoke lands after it.)
* a coroutine that ignores the cancel of a revoke or a soft limit for
  ``LEFTOVER_TIMEOUT`` seconds is left running on its loop, with a warning:
  the task ends without it (on a thread's loop once what it spawned has had
  ``LEFTOVER_TIMEOUT`` more to end, as after any call), and the worker's
  thread is free.
* a warm shutdown whose deadline passed (``setup(..., drain_timeout=...)``)
  cancels the coroutines still running; with ``acks_late`` and
  ``task_reject_on_worker_lost`` the message goes back to the queue, as it
  would had the worker been lost, otherwise the task fails with ``CallCancelled``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Container, Generator
from typing import Any, TypeVar

from celery.app.task import Context
from celery.exceptions import Reject, SoftTimeLimitExceeded, TaskRevokedError

from celery import Task
from neopool import runner
from neopool.errors import CallCancelled
from neopool.runner import run

logger = logging.getLogger("neopool")

T = TypeVar("T")


class _Running:
    """Whether an AsyncTask's call still runs (tasks its coroutine spawned may outlive it)."""

    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False


#: ``(task, request, running)`` of the AsyncTask whose coroutine is running (see
#: ``AsyncTask.request``).
_current_request: contextvars.ContextVar[tuple[AsyncTask, Context, _Running] | None] = (
    contextvars.ContextVar("neopool_celery_request", default=None)
)

#: Whether the worker's pool signals soft time limits to the task (prefork).
_soft_limits_signalled = False
#: Whether a revocation can reach this process while a task runs (not in a prefork child,
#: whose parent hears of it; not under solo, whose one thread is running the task).
_revocations_heard = True


def worker_pool(kind: str) -> None:
    """Tell AsyncTask the worker's pool (``prefork``, ``threads`` or ``solo``).

    :func:`neopool.celery.setup` calls it at worker start. Prefork signals soft
    time limits to its children: AsyncTask then keeps no timer of its own (two
    for one limit would race) and instead catches the signal where asyncio would
    drop it (see :func:`_catch_a_lost_soft_limit`). A prefork child never hears
    of a revocation (the parent does, and terminates the child if asked to), and
    a solo worker hears none while its one thread runs the task, so AsyncTask
    does not watch for one there: a task with no soft limit runs its coroutine
    as the call's own task.
    """
    global _soft_limits_signalled, _revocations_heard
    _soft_limits_signalled = kind == "prefork"
    _revocations_heard = kind not in ("prefork", "solo")


class AsyncTask(Task):  # type: ignore[misc]
    """A Celery task base class whose ``run`` may be an ``async def``."""

    abstract = True
    #: Seconds between checks for revocation of a running task, under the threads pool
    #: (a revoke is noticed within ``revocation_poll`` plus 0.05 s); ``math.inf`` never
    #: checks.
    revocation_poll: float = 0.25

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        poll = cls.revocation_poll
        if not (isinstance(poll, (int, float)) and poll > 0):  # NaN fails this too
            raise ValueError(
                f"{cls.__name__}.revocation_poll must be a positive number of seconds, "
                f"not {poll!r}: 0.25 checks four times a second, math.inf never"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        if not inspect.isawaitable(result):
            return result  # a sync task: it may call neopool.run itself
        # Taken here, on Celery's thread: the coroutine may run on another one.
        request = self.request
        soft_limit = self._soft_time_limit(request)
        poll = self.revocation_poll
        task_id = getattr(request, "id", None) if _revocations_heard and poll < math.inf else None
        # Under prefork a signal handler raises in the main thread: only a call on its
        # loop can be hit by one (the process loop runs in a thread of its own).
        signalled = _soft_limits_signalled and _on_main_threads_loop()
        if task_id is not None or soft_limit is not None:
            coro = _supervised(result, task_id, poll, soft_limit, signalled)
        elif signalled:
            coro = _as_prefork_child(result)
        else:  # nothing to watch: the coroutine runs as the call's own task
            coro = result if inspect.iscoroutine(result) else _awaited(result)
        # The call's task starts with a copy of this context: its code (and the tasks
        # it spawns) sees the request, and the call's end.
        running = _Running()
        token = _current_request.set((self, request, running))
        try:
            return run(coro)
        except CallCancelled as exc:
            if self._requeue_when_cut_off():
                raise Reject(str(exc), requeue=True) from exc
            raise
        finally:
            running.over = True
            _current_request.reset(token)

    @property
    def request(self) -> Context:
        """The request this task is handling: in its coroutine, the one it was called with.

        Celery's own (``Task._get_request``) comes from a thread-local stack,
        empty on the process loop's thread. Tasks the coroutine spawns see its
        request while the call runs; one that outlives it (``runner.detached()``)
        does not keep a finished call's request.
        """
        current = _current_request.get()
        if current is not None and current[0] is self:
            # Once the call is over, none: Celery's own would be whatever the
            # thread runs now, another call's request.
            return current[1] if not current[2].over else Context()
        return self._get_request()

    def _soft_time_limit(self, request: Context) -> float | None:
        """This run's soft time limit (the message's, else the task's or the app's), if any.

        The task's or the app's is read on the task's first run and kept: the app's
        settings are a chain of mappings, too slow to look through on every task (a
        worker reads them once, at its start, too).
        """
        limits = getattr(request, "timelimit", None)
        soft = limits[1] if limits and len(limits) > 1 else None
        if soft:
            return float(soft)
        try:
            return self.__dict__["_neopool_soft_limit"]  # type: ignore[no-any-return]
        except KeyError:
            soft = self.soft_time_limit or self.app.conf.task_soft_time_limit
            default = self.__dict__["_neopool_soft_limit"] = float(soft) if soft else None
            return default

    def _requeue_when_cut_off(self) -> bool:
        """Whether a task cut off by shutdown goes back to the queue (as on a lost worker)."""
        conf = self.app.conf
        acks_late = self.acks_late if self.acks_late is not None else conf.task_acks_late
        reject = getattr(self, "reject_on_worker_lost", None)
        if reject is None:
            reject = conf.task_reject_on_worker_lost
        return bool(acks_late and reject)


async def _supervised(
    awaitable: Awaitable[T],
    task_id: str | None,
    poll: float,
    soft_limit: float | None,
    signalled: bool,
) -> T:
    """Await ``awaitable``; cancel it when task ``task_id`` (if given) is revoked, checked
    every ``poll`` s; deliver ``SoftTimeLimitExceeded`` into it when the task's soft time
    limit passes (``signalled``: a soft-limit signal may land on this loop).

    The coroutine runs in the call's own task, under this frame. What may end it
    early is a :class:`_Watch`, checked by its loop's one timer (:class:`_Watches`).
    The soft limit comes from that timer (threads, solo), or, under prefork, from
    Celery's signal: raised while the loop waits, the runner hands it here
    (:func:`neopool.runner.deliver_interrupts`); raised in a loop callback, the
    loop's exception handler takes it (:func:`_catch_a_lost_soft_limit`). Either way
    it is thrown into the coroutine at its await point (:class:`_Deliverable`); the
    coroutine then has ``LEFTOVER_TIMEOUT`` seconds to clean up and return (its
    outcome is the task's) before it is cancelled. A coroutine that ignores that
    cancel (or a revoke's) for ``LEFTOVER_TIMEOUT`` more is given up on: the task
    ends without it, and it is left running (see :meth:`_Watch.check`).
    """
    main = asyncio.current_task()  # the call's task
    assert main is not None
    loop = asyncio.get_running_loop()
    deliverable = _Deliverable(awaitable) if soft_limit is not None else None
    watch = _Watch(
        main=main,
        call=runner._this_call(),
        watches=_watches_of(loop),
        revoked=_revoked_ids() if task_id is not None else None,
        task_id=task_id,
        poll=poll,
        deliverable=deliverable,
        soft_limit=soft_limit,
        # Under prefork the soft limit comes as a signal: no time of AsyncTask's own.
        deadline=loop.time() + soft_limit
        if soft_limit is not None and not _soft_limits_signalled
        else math.inf,
    )
    if deliverable is not None:
        deliverable.task = main
        deliverable.thrown_hook = watch.clean_up_time
        runner.deliver_interrupts(deliverable.throw)
        if signalled:
            watch.catcher = _catch_a_lost_soft_limit(loop, main, deliverable=deliverable)
    watch.watches.add(watch)
    try:
        result = await (deliverable if deliverable is not None else awaitable)
    except asyncio.CancelledError:
        if watch.ending is None or watch.call.caller_gone:
            raise  # cancelled from outside (a shutdown), or nobody waits for its outcome
        if sys.version_info >= (3, 11):
            main.uncancel()  # taken back: the task fails with its ending instead
        raise watch.ending from None
    finally:
        watch.release()
    if watch.ending is not None and not watch.call.caller_gone:
        raise watch.ending  # it caught the cancel and returned: the task still fails
    return result


class _Watch:
    """What may end one AsyncTask call early, and what the call holds for it until it
    ends: a revocation (polled every ``poll`` s), its soft limit (at loop time
    ``deadline``, when AsyncTask keeps the time), then the time the coroutine has to
    end. :meth:`check` acts on what is due; :meth:`release` lets go, once."""

    __slots__ = (
        "call",
        "catcher",
        "deadline",
        "deliverable",
        "due",
        "ending",
        "give_up_at",
        "main",
        "poll",
        "revoked",
        "soft_limit",
        "task_id",
        "watches",
    )

    def __init__(
        self,
        *,
        main: asyncio.Task[Any],
        call: runner._Call,
        watches: _Watches,
        revoked: Container[str] | None,
        task_id: str | None,
        poll: float,
        deliverable: _Deliverable | None,
        soft_limit: float | None,
        deadline: float,
    ) -> None:
        self.main = main
        #: The runner's call it runs in (the task running it is ``main``).
        self.call = call
        self.watches = watches
        self.revoked = revoked
        self.task_id = task_id
        self.poll = poll
        self.deliverable = deliverable
        self.soft_limit = soft_limit
        self.deadline = deadline
        #: Under prefork: the loop's handler of a soft limit landing in a callback.
        self.catcher: _LostSoftLimits | None = None
        #: Why the task ends, once it must: its coroutine was cancelled then.
        self.ending: BaseException | None = None
        self.give_up_at = math.inf
        #: The loop time of the next check (``inf``: none).
        self.due = min(deadline, main.get_loop().time() + poll if revoked is not None else math.inf)

    def check(self, now: float) -> None:
        """At loop time ``now``: act on what is due, and set :attr:`due` to the next check."""
        self.due = math.inf
        if self.main.done():
            return
        if self.ending is not None:  # cancelled, and not ended since
            if now < self.give_up_at:
                self.due = self.give_up_at
                return
            self.release()  # the call ends now: what it holds goes back with it
            self.call.give_up(self.ending)
            return
        if self.revoked is not None and self.task_id in self.revoked:
            self._end(TaskRevokedError(f"task {self.task_id} was revoked while running"), now)
            return
        deliverable = self.deliverable
        if deliverable is not None and deliverable.delivered is not None:
            # Thrown in (by the timer or the signal): the time to clean up runs.
            clean_up_by = deliverable.delivered + runner.LEFTOVER_TIMEOUT
            if now < clean_up_by:
                self.due = clean_up_by
            else:
                # A new exception: the one thrown in holds the coroutine's frames, which
                # Celery clears as the task fails with it (closing a coroutine left running).
                self._end(
                    SoftTimeLimitExceeded(
                        f"soft time limit ({self.soft_limit:g} s) exceeded, and the task "
                        f"did not end within {runner.LEFTOVER_TIMEOUT:g} s"
                    ),
                    now,
                )
                return
        elif now >= self.deadline:
            assert deliverable is not None  # a deadline comes with a soft limit
            # Thrown in: clean_up_time() (the hook) sets the next check.
            deliverable.throw(
                SoftTimeLimitExceeded(f"soft time limit ({self.soft_limit:g} s) exceeded")
            )
        else:
            self.due = self.deadline
        if self.revoked is not None:
            self.due = min(self.due, now + self.poll)

    def clean_up_time(self) -> None:
        """The soft limit was thrown into the coroutine (by the timer or the signal):
        check again when its time to clean up is over."""
        deliverable = self.deliverable
        assert deliverable is not None
        assert deliverable.delivered is not None
        self.due = min(self.due, deliverable.delivered + runner.LEFTOVER_TIMEOUT)
        self.watches.add(self)

    def _end(self, outcome: BaseException, now: float) -> None:
        """The task ends with ``outcome``: its coroutine is cancelled, and given
        ``LEFTOVER_TIMEOUT`` s to end before the task ends without it."""
        self.ending = outcome
        self.give_up_at = self.due = now + runner.LEFTOVER_TIMEOUT
        self.main.cancel(f"neopool: {outcome}")

    def release(self) -> None:
        """No more checks, and no more soft-limit signals caught for it (once; whichever of
        the call's end and the coroutine's comes first)."""
        self.watches.discard(self)
        catcher, self.catcher = self.catcher, None
        if catcher is not None:
            catcher.release(self.main)


class _Watches:
    """The watched AsyncTask calls of one loop, and the one timer that checks them: a
    timer per call would cost every call a heap push and a cancel.

    The timer is armed for the earliest check due, rounded up to a ``TICK`` grid so
    that calls checked at nearby times share a tick, and stops once nothing is
    watched. Nothing here refers to the loop strongly, its timer included (it is
    not cancelled, only superseded): the loop holds its timer, which holds this.
    """

    #: Seconds: the checks' grid (a revoke is noticed within ``revocation_poll + TICK``).
    TICK = 0.05

    __slots__ = ("__weakref__", "_loop", "_when", "watches")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.watches: dict[_Watch, None] = {}
        #: The loop time the timer is armed for (``inf``: not armed).
        self._when = math.inf

    def add(self, watch: _Watch) -> None:
        """Check ``watch`` from its :attr:`_Watch.due` on (nothing if that is ``inf``)."""
        if watch.due == math.inf:
            return
        self.watches[watch] = None
        self._arm(watch.due)

    def discard(self, watch: _Watch) -> None:
        self.watches.pop(watch, None)  # the timer stays: it stops when it finds none

    def _arm(self, due: float) -> None:
        """Have the timer fire by ``due`` (on the grid), unless it fires by then already."""
        if due == math.inf:
            return
        when = math.ceil(due / self.TICK) * self.TICK
        loop = self._loop()
        if when >= self._when or loop is None or loop.is_closed():
            return
        self._when = when
        loop.call_at(when, self._tick, when)

    def _tick(self, when: float) -> None:
        if when != self._when:
            return  # superseded by an earlier one, which has run
        self._when = math.inf
        loop = self._loop()
        assert loop is not None  # it runs this
        now = loop.time()
        earliest = math.inf
        try:
            for watch in list(self.watches):
                if watch.due <= now:
                    watch.check(now)
                if watch.due == math.inf:
                    self.watches.pop(watch, None)
                else:
                    earliest = min(earliest, watch.due)
        except BaseException:
            # A check raised (a signal's exception, landing here): the others stay watched.
            self._arm(min((watch.due for watch in self.watches), default=math.inf))
            raise
        self._arm(earliest)


#: Each loop's :class:`_Watches`, made on its first watched call.
_watches_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watches] = (
    weakref.WeakKeyDictionary()
)
#: The last loop's watches, per thread: most calls come on the loop the last came on.
_recent = threading.local()


def _watches_of(loop: asyncio.AbstractEventLoop) -> _Watches:
    recent: tuple[weakref.ref[asyncio.AbstractEventLoop], _Watches] | None = getattr(
        _recent, "watches", None
    )
    if recent is not None and recent[0]() is loop:
        return recent[1]
    watches = _watches_by_loop.get(loop)
    if watches is None:
        watches = _watches_by_loop[loop] = _Watches(loop)
    _recent.watches = (weakref.ref(loop), watches)
    return watches


async def _as_prefork_child(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` in a prefork child, for a task without a soft limit: only a
    revoke's signal can end it early (``revoke(..., terminate=True, signal="SIGUSR1")``),
    and one landing in a loop callback cancels the call's task here."""
    call = asyncio.current_task()
    assert call is not None
    lost: list[BaseException] = []
    catcher = _catch_a_lost_soft_limit(asyncio.get_running_loop(), call, lost=lost)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if lost:
            raise lost[0] from None
        raise
    finally:
        catcher.release(call)
    if lost:  # it caught the cancel and returned: the revoke still ends the task
        raise lost[0]
    return result


async def _awaited(awaitable: Awaitable[T]) -> T:
    """An awaitable that is no coroutine (a task's ``run`` may return one), as one."""
    return await awaitable


def _on_main_threads_loop() -> bool:
    """Whether a call made here runs on the main thread's loop."""
    return runner.loop_mode() == "thread" and threading.current_thread() is threading.main_thread()


#: ``celery.worker.state.revoked``, once imported (see :func:`_revoked_ids`).
_revoked: Container[str] | None = None


def _revoked_ids() -> Container[str]:
    """The ids of the tasks this worker was told are revoked (imported on first use: the
    worker's module is heavy for a process that only sends tasks)."""
    global _revoked
    if _revoked is None:
        from celery.worker import state as worker_state

        _revoked = worker_state.revoked
    return _revoked


#: The message of the cancel that carries an exception to :class:`_Deliverable`.
_THROWING = "neopool: throwing an exception into the coroutine at its await point"


class _Deliverable:
    """Awaits a coroutine step by step, so that an exception can be thrown into it at
    the point where it waits (Celery's ``SoftTimeLimitExceeded``, as a sync task gets
    it wherever it is).

    ``asyncio`` has no public way to throw into a task (calling ``throw`` on a task's
    coroutine from outside breaks the task's stepping), and a cancel arrives as
    ``CancelledError``, which ``except SoftTimeLimitExceeded`` does not catch. So the
    task awaits this object, which relays every step of the coroutine (``send`` and
    ``throw``, as ``await`` does) and sits between the task and the coroutine:
    :meth:`throw` cancels the task with a marker, and when that cancellation reaches
    this frame it throws the exception into the coroutine in its place (and takes
    the cancel back: ``Task.uncancel`` on 3.11+). The awaited future is cancelled as
    on any cancel, so the code below the await point sees the exception where it
    waited, as it would see the cancellation. Only Task's public API is used, so it
    works alike on 3.10-3.13 and uvloop. The relay costs one Python frame per step:
    AsyncTask uses it only for tasks with a soft time limit.
    """

    __slots__ = ("coro", "delivered", "pending", "task", "thrown", "thrown_hook")

    def __init__(self, coro: Awaitable[Any]) -> None:
        self.coro = coro.__await__()
        #: The task awaiting this object.
        self.task: asyncio.Future[Any] | None = None
        #: What :meth:`throw` was given; when (loop time); and whether it is still on its way.
        self.thrown: BaseException | None = None
        self.delivered: float | None = None
        self.pending: BaseException | None = None
        #: Called once :meth:`throw` has thrown (AsyncTask's supervisor arms its next check).
        self.thrown_hook: Callable[[], None] | None = None

    def throw(self, exc: BaseException) -> None:
        """On the loop, while it runs: throw ``exc`` into the coroutine where it waits (once)."""
        task = self.task
        if self.thrown is not None or task is None or task.done():
            return
        self.thrown = self.pending = exc
        self.delivered = asyncio.get_running_loop().time()
        task.cancel(_THROWING)
        if self.thrown_hook is not None:
            self.thrown_hook()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = yield step
            except GeneratorExit:
                coro.close()
                raise
            except asyncio.CancelledError as cancel:
                error = cancel
                pending = self.pending
                if pending is not None and cancel.args and cancel.args[0] == _THROWING:
                    error, self.pending = pending, None
                    current = asyncio.current_task()
                    if sys.version_info >= (3, 11) and current is not None:
                        current.uncancel()  # taken back: the coroutine gets ``pending``
            except BaseException as exc:
                error = exc


class _LostSoftLimits:
    """A loop's exception handler under prefork (the main thread's loop), installed once.

    Celery's soft-limit signal raises ``SoftTimeLimitExceeded`` wherever the main
    thread is. In the task's code, or while the loop waits, it reaches the task as
    it should; in a plain loop callback (a driver decoding records) asyncio logs the
    exception and goes on, and the task would run until its hard limit. This
    handler takes it instead, for the call running on the loop (:attr:`work`, the
    task running its coroutine): it is thrown into the coroutine through
    :attr:`deliverable`, or (a task without a soft limit of its own: a revoke's
    signal) :attr:`work` is cancelled and :attr:`lost` says why. Anything else
    goes to the handler it replaced.
    """

    __slots__ = ("deliverable", "lost", "previous", "work")

    def __init__(
        self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> None:
        self.previous = previous
        self.work: asyncio.Future[Any] | None = None
        self.lost: list[BaseException] | None = None
        self.deliverable: _Deliverable | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        work = self.work
        if isinstance(error, SoftTimeLimitExceeded) and work is not None and not work.done():
            if self.deliverable is not None:
                self.deliverable.throw(error)
            else:
                assert self.lost is not None  # given where there is nothing to throw into
                self.lost.append(error)
                work.cancel()
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def release(self, work: asyncio.Future[Any]) -> None:
        """``work``'s call has ended: a signal from now on is none of its business (unless
        a later call has taken its place already)."""
        if self.work is work:
            self.work = self.lost = self.deliverable = None


def _catch_a_lost_soft_limit(
    loop: asyncio.AbstractEventLoop,
    work: asyncio.Future[Any],
    lost: list[BaseException] | None = None,
    deliverable: _Deliverable | None = None,
) -> _LostSoftLimits:
    """Under prefork: a soft-limit signal landing in one of ``loop``'s callbacks ends the
    call that ``work`` runs (see :class:`_LostSoftLimits`, installed on the loop's first
    call). The caller releases it when the call ends."""
    catcher = loop.get_exception_handler()
    if not isinstance(catcher, _LostSoftLimits):
        catcher = _LostSoftLimits(catcher)
        loop.set_exception_handler(catcher)
    catcher.work, catcher.lost, catcher.deliverable = work, lost, deliverable
    return catcher
