"""Credentials that change while workers run: a provider, one driver auth manager per loop.

Pass ``credentials=provider`` to :class:`~neopool.Neo4jConnectionConfig`: a
function (plain or ``async``) that returns the credentials to use now, as

* a ``(user, password)`` tuple,
* a :class:`neo4j.Auth` (``neo4j.basic_auth(...)``, ``neo4j.bearer_auth(token)``, ...), or
* a :class:`neo4j.auth_management.ExpiringAuth` wrapping either, with the time it
  expires (``ExpiringAuth(neo4j.bearer_auth(token)).expires_in(3600)``).

Each loop's driver gets an auth manager of its own (:class:`ProviderAuthManager`,
an implementation of the driver's :class:`~neo4j.auth_management.AsyncAuthManager`
interface; a manager's lock belongs to one event loop, so none is shared). It
behaves as the driver's expiration-based manager
(``AsyncAuthManagers.bearer``; for plain credentials, ``AsyncAuthManagers.basic``):
it calls the provider for the first connection, caches what it returns, and
calls it again when that expires or when the server rejects it on an open
connection (``Neo.ClientError.Security.Unauthorized`` or ``TokenExpired``: the
request fails with the driver's ``AuthError``, which managed transactions such
as ``execute_query`` retry). New connections, and pooled ones the driver logs
on again, use what it returns.

Two things the driver's own managers do not do, and this one does:

* The driver tells a manager nothing when a *new* connection's logon is
  refused (only errors on established connections reach it), so a manager that
  cached a stale password keeps handing it out. neopool tells it instead: a
  borrower that leaves its ``async with`` (or ``return_connection``) with an
  ``AuthError`` marks the credential its task's last logon used as rejected
  (or, where that is not known, has the provider asked again).
* A rejection that comes while the secrets store still has the old password
  (the server changed first) would make the driver's manager fetch the old
  password again and keep it. This one does not hand out a credential the
  server turned down straight away: it asks the provider again (after
  0.02 s, then backing off to every 0.25 s) for up to 5 s (never longer than
  the logon's bound), until it returns a different one (used at once), and
  only then tries the old one again. Connections wait that long instead of
  failing logons, which servers count towards locking the user out
  (Neo4j: 3 failures lock it for 5 s by default; ArcadeDB: 5 failures, about
  30 s, even for the right password).

A plain function runs in a thread of its own (a daemon thread, so a provider
that never answers cannot hold up the interpreter's exit), so a provider that
reads a file or asks a secrets manager synchronously never blocks the event
loop; an ``async`` function runs on the loop. Either may be called from
several loops (threads) at once.

A provider call is bounded: a logon waits for it at most the manager's
``timeout`` (the config's ``connection_acquisition_timeout``, the time a query
waits for a connection), then fails with :class:`~neopool.CredentialsTimeout`.
One call is made at a time per manager: logons that need an answer while one
is on its way wait for that one (each within its own bound), so a provider
that hangs holds one thread, not one per logon, and no lock is held while it
runs. The provider must always return
credentials of the same user (the driver's rule for auth managers) and must not
use neopool or the driver itself. An exception it raises reaches the borrower.

Nothing here logs or shows the credentials: errors name types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from neo4j import Auth
from neo4j.auth_management import AsyncAuthManager, ExpiringAuth

from neopool.errors import CredentialsTimeout

if TYPE_CHECKING:
    from neo4j import AsyncDriver
    from neo4j.exceptions import Neo4jError

__all__ = ["Credentials", "CredentialsProvider", "ProviderAuthManager"]

#: What a credentials provider may return.
Credentials = tuple[str, str] | Auth | ExpiringAuth
#: A plain or ``async`` function of no arguments returning :data:`Credentials`.
CredentialsProvider = Callable[[], Credentials | Awaitable[Credentials]]


#: While the provider keeps returning a credential the server rejected, it is asked again
#: after this many seconds, then twice as long each time up to _RECHECK_MAX_S...
_RECHECK_S = 0.02
_RECHECK_MAX_S = 0.25
#: ...for this long, before that credential is tried again anyway (seconds): longer than
#: the usual gap between a server's password change and the secrets store's.
_REJECTED_GRACE_S = 5.0
#: How long a logon waits for the provider when no config says (the driver's default
#: ``connection_acquisition_timeout``); pools use their config's.
_DEFAULT_TIMEOUT_S = 30.0
#: The server's errors that mean "these credentials are no longer good" (as ``bearer``).
_HANDLED_CODES = frozenset(
    ("Neo.ClientError.Security.Unauthorized", "Neo.ClientError.Security.TokenExpired")
)


#: The manager and credential of the last logon in this task: the driver asks for the
#: credential in the task that then logs on, and the borrower returns its lease there.
_last_logon: contextvars.ContextVar[tuple[ProviderAuthManager, Any] | None] = (
    contextvars.ContextVar("neopool_last_logon", default=None)
)


class ProviderAuthManager(AsyncAuthManager):
    """A driver auth manager fed by a credentials provider; one per driver.

    Made by :meth:`Neo4jConnectionConfig.driver_auth
    <neopool.Neo4jConnectionConfig.driver_auth>`; see the module documentation.
    ``timeout`` bounds each logon's wait for the provider (seconds).
    """

    def __init__(self, provider: CredentialsProvider, timeout: float = _DEFAULT_TIMEOUT_S) -> None:
        self._provider = provider
        self.timeout = timeout
        self._current: ExpiringAuth | None = None
        self._rejected: Any = None  # the credential the server last turned down, if any
        self._refetch = False  # a borrower met an AuthError: ask the provider again
        #: The provider's answer on its way (one at a time); ``None`` when none is.
        self._call: asyncio.Future[object] | None = None

    def __repr__(self) -> str:
        return f"<ProviderAuthManager of {_name(self._provider)}>"

    async def get_auth(self) -> Any:
        """The credentials for the next logon (or re-logon) of a connection."""
        deadline = time.monotonic() + self.timeout
        current = self._current
        if current is None or self._refetch or _expired(current):
            current = await self._refresh(deadline)
        if self._rejected is not None and current.auth == self._rejected:
            current = await self._await_another(current, deadline)
        _last_logon.set((self, current.auth))
        return current.auth

    async def handle_security_exception(self, auth: Any, error: Neo4jError) -> bool:
        """The server rejected ``auth`` on an open connection: fetch anew if it is current."""
        if error.code not in _HANDLED_CODES:
            return False
        self._rejected = auth
        if self._current is not None and self._current.auth == auth:
            try:
                await self._refresh(time.monotonic() + self.timeout)
            except Exception:  # the next logon asks again, and reports what it gets
                self._refetch = True
        return True  # the driver marks the error retryable

    def reject(self, auth: Any) -> None:
        """The server refused ``auth`` where the driver did not say so (a new logon)."""
        self._rejected = auth

    def refetch(self) -> None:
        """Ask the provider again before the next logon (a refused credential, not known which)."""
        self._refetch = True

    async def _await_another(self, current: ExpiringAuth, deadline: float) -> ExpiringAuth:
        """Ask the provider until it stops returning the rejected credential, for a while.

        For ``_REJECTED_GRACE_S`` (5 s) at most, and never past the logon's ``deadline``.
        """
        give_up = min(time.monotonic() + _REJECTED_GRACE_S, deadline)
        pause = _RECHECK_S
        while current.auth == self._rejected and time.monotonic() < give_up:
            await asyncio.sleep(min(pause, max(0.0, give_up - time.monotonic())))
            pause = min(2 * pause, _RECHECK_MAX_S)
            current = await self._refresh(deadline)
        # A different credential, or the same one after the grace: either way the server
        # decides now (a rejection on an open connection or by a borrower marks it again).
        self._rejected = None
        return current

    async def _refresh(self, deadline: float) -> ExpiringAuth:
        """The provider's next answer, waited for until ``deadline`` at most.

        Joins the call on its way if there is one, otherwise starts one; the
        wait is bounded, the call itself is not (a thread cannot be stopped):
        it stays the one to join until it answers.
        """
        call = self._call
        if call is None:
            self._refetch = False
            call = self._call = _start_call(self._provider)
            call.add_done_callback(self._answered)
        try:
            result = await asyncio.wait_for(
                asyncio.shield(call), max(0.0, deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            raise CredentialsTimeout(_name(self._provider), self.timeout) from None
        current = _as_expiring_auth(result, self._provider)
        if self._call is None:  # a newer call on its way would answer for now instead
            self._current = current
        return current

    def _answered(self, call: asyncio.Future[object]) -> None:
        if self._call is call:
            self._call = None
            # Current from the moment it is answered: a logon that comes before the
            # waiters have resumed uses it instead of asking the provider again.
            if not call.cancelled() and call.exception() is None:
                with contextlib.suppress(Exception):  # a bad answer: its waiters report it
                    self._current = _as_expiring_auth(call.result(), self._provider)
        if not call.cancelled():
            call.exception()  # retrieved here: every logon waiting for it sees it too


def auth_manager(
    provider: CredentialsProvider, timeout: float = _DEFAULT_TIMEOUT_S
) -> ProviderAuthManager:
    """A new driver auth manager that takes its credentials from ``provider``.

    One per driver: the manager's pending call belongs to the event loop of the
    driver that uses it. Give the driver to :func:`track` once it is made.
    """
    return ProviderAuthManager(provider, timeout)


#: The provider-fed manager of each driver neopool made (weakly: the driver owns it).
_managers: weakref.WeakKeyDictionary[AsyncDriver, ProviderAuthManager] = weakref.WeakKeyDictionary()


def track(driver: AsyncDriver, auth: object) -> None:
    """Remember ``auth`` as ``driver``'s manager, if it is a provider-fed one."""
    if isinstance(auth, ProviderAuthManager):
        _managers[driver] = auth


def credential_rejected(driver: AsyncDriver | None) -> None:
    """A borrower of ``driver`` got an ``AuthError``: tell the driver's manager.

    Called in the borrower's task, where the driver asked the manager for the
    credential of its last logon: that one is rejected. Where it is not known
    (the lease came back in another task), the provider is just asked again.
    """
    manager = _managers.get(driver) if driver is not None else None
    if manager is None:
        return
    last = _last_logon.get()
    if last is not None and last[0] is manager:
        manager.reject(last[1])
    else:
        manager.refetch()


def _expired(auth: ExpiringAuth) -> bool:
    return auth.expires_at is not None and auth.expires_at < time.time()


def _start_call(provider: CredentialsProvider) -> asyncio.Future[object]:
    """One call of ``provider``, started now; its answer (or error) as a future of this loop.

    Runs outside the caller's context, so no call of neopool's runner claims it.
    """
    loop = asyncio.get_running_loop()
    if _is_async(provider):
        return contextvars.Context().run(loop.create_task, _awaited(provider))
    answer: asyncio.Future[object] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: object, error: BaseException | None) -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    def run() -> None:
        result: object = None
        error: BaseException | None = None
        try:
            result = context.run(provider)
        except BaseException as exc:
            error = exc
        try:
            if error is None and inspect.isawaitable(result):  # awaited on the loop
                loop.call_soon_threadsafe(_chain, answer, result)
            else:
                loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    thread = threading.Thread(
        target=run, name=f"neopool-credentials-{_name(provider)}", daemon=True
    )
    thread.start()
    return answer


async def _awaited(provider: CredentialsProvider) -> object:
    result: object = provider()
    if inspect.isawaitable(result):
        result = await result
    return result


def _chain(answer: asyncio.Future[object], awaitable: Awaitable[object]) -> None:
    """On the loop: ``answer`` gets what ``awaitable`` (made by a plain provider) returns."""

    async def wait() -> object:
        return await awaitable

    if answer.done():
        return
    task = contextvars.Context().run(asyncio.ensure_future, wait())

    def done(task: asyncio.Future[object]) -> None:
        if answer.done():
            if not task.cancelled():
                task.exception()
        elif task.cancelled():
            answer.cancel()
        elif task.exception() is not None:
            answer.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            answer.set_result(task.result())

    task.add_done_callback(done)


def _as_expiring_auth(result: object, provider: object = None) -> ExpiringAuth:
    """``result`` as the driver's :class:`ExpiringAuth`; a clear ``TypeError`` if it is none.

    The message names the type that came back, never its value.
    """
    if isinstance(result, ExpiringAuth):
        _check_auth(result.auth, provider, "ExpiringAuth.auth")
        return result
    _check_auth(result, provider, "the result")
    return ExpiringAuth(result)  # type: ignore[arg-type]  # checked just above


def _check_auth(auth: object, provider: object, what: str) -> None:
    if isinstance(auth, Auth):
        return
    if isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(part, str) for part in auth):
        return
    shape = (
        f"a tuple of {len(auth)} ({', '.join(type(part).__name__ for part in auth)})"
        if isinstance(auth, tuple)
        else f"{type(auth).__name__}"
    )
    raise TypeError(
        f"the credentials provider {_name(provider)} returned {shape} as {what}; "
        f"return a (user, password) tuple of str, a neo4j.Auth (e.g. neo4j.basic_auth(...), "
        f"neo4j.bearer_auth(token)) or an ExpiringAuth wrapping one"
    )


def _is_async(provider: object) -> bool:
    while isinstance(provider, functools.partial):
        provider = provider.func
    return inspect.iscoroutinefunction(provider) or inspect.iscoroutinefunction(
        getattr(provider, "__call__", None)  # noqa: B004  (an object with an async __call__)
    )


def _name(provider: object) -> str:
    if provider is None:
        return ""
    name = getattr(provider, "__qualname__", None) or type(provider).__qualname__
    return repr(str(name))
