"""``@app.task(base=AsyncTask) async def f(...)``: async tasks on a persistent loop.

Celery calls a task synchronously. ``asyncio.run`` inside it would make a new
loop, and so a new driver, on every task; :class:`AsyncTask` runs the
coroutine on the worker thread's persistent loop (:func:`neopool.run`), so
every task after the first borrows from a driver that is already connected.

Cancellation returns leases:

* a soft time limit (prefork) raises ``SoftTimeLimitExceeded`` in the task; the
  coroutine is cancelled or sees the exception, and its ``async with`` blocks
  return their leases before the task fails;
* ``revoke(task_id, terminate=True, signal="SIGUSR1")`` under prefork does the same;
  the default ``SIGTERM`` kills the child, and the server sees its sockets close;
* under threads, where Celery cannot signal a thread, a revoked running task
  is noticed within ``revocation_poll`` seconds and its coroutine cancelled;
  the task then fails with ``TaskRevokedError``. (Under solo the worker hears
  no remote control while its one thread runs a task, so a revoke lands after it.)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar

from celery.exceptions import TaskRevokedError

from celery import Task
from neopool.runner import run

T = TypeVar("T")


class AsyncTask(Task):  # type: ignore[misc]
    """A Celery task base class whose ``run`` may be an ``async def``."""

    abstract = True
    #: Seconds between checks for revocation of a running task (threads/solo).
    revocation_poll: float = 0.25

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        if not inspect.isawaitable(result):
            return result  # a sync task: it may call neopool.run itself
        task_id = getattr(self.request, "id", None)
        return run(_until_revoked(result, task_id, self.revocation_poll))


async def _until_revoked(awaitable: Awaitable[T], task_id: str | None, poll: float) -> T:
    """Await ``awaitable``, cancelling it if the worker learns ``task_id`` was revoked."""
    if task_id is None:
        return await awaitable
    from celery.worker import state as worker_state

    work: asyncio.Future[T] = asyncio.ensure_future(_as_coroutine(awaitable))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=poll)
            if done:
                return work.result()
            if task_id in worker_state.revoked:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                raise TaskRevokedError(f"task {task_id} was revoked while running")
    finally:
        if not work.done():  # we were cancelled (soft time limit): pass it on
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
