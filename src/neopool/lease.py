"""A lease: the right to use one event loop's driver until it is returned.

A lease is not a socket. The loop's :class:`neo4j.AsyncDriver` already pools
sockets; a lease bounds how many borrowers use it at once (``pool_max_size``)
and remembers where it was borrowed, so one that never comes back can be named.
"""

from __future__ import annotations

import asyncio
import os
import sys
import weakref
from asyncio import _get_running_loop
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING

from neopool.errors import LeaseError

__all__ = ["PooledConnectionManager"]

if TYPE_CHECKING:
    from neo4j import AsyncDriver

    from neopool.loop_pool import EventLoopConnectionPool

#: Frames from these folders are skipped when recording where a lease was borrowed.
_SKIPPED_DIRS = (os.path.dirname(__file__), os.path.dirname(asyncio.__file__))
#: Whether a code object's frames are skipped, decided once per code object.
_skipped_code: dict[CodeType, bool] = {}
_MAX_CLASSIFIED = 10_000

#: Where a lease was borrowed: the code and line, formatted only when read.
BorrowSite = tuple[CodeType, int]


if TYPE_CHECKING:
    _WeakLease = weakref.ref["PooledConnectionManager"]
else:
    _WeakLease = weakref.ref


class LeaseRef(_WeakLease):
    """A pool's weak reference to one of its leases, and where its borrow was made
    (kept here: the lease itself may be collected before it is reported lost)."""

    __slots__ = ("site",)

    #: Where the current borrow was made, once the borrow has recorded it.
    site: BorrowSite | None

    def __new__(
        cls, lease: PooledConnectionManager, callback: Callable[[LeaseRef], None] | None = None
    ) -> LeaseRef:
        ref = super().__new__(cls, lease, callback)
        ref.site = None
        return ref


#: The weak references of leases out now. Held here, outside any pool, so a
#: lease collected together with its pool and loop is still reported.
outstanding: set[LeaseRef] = set()


class PooledConnectionManager:
    """A lease on the driver of one event loop, handed out by its pool.

    While borrowed, the pool refers to it only weakly: a lease whose holder is
    collected without returning it goes back to its pool (with a warning naming
    where it was borrowed).

    Its state (:attr:`in_use`) is the pool's to change, when it lends the lease
    and when the lease comes back; :meth:`mark_available` returns it through
    the pool, and :meth:`mark_in_use` refuses (only a borrow takes a lease).
    """

    __slots__ = ("__weakref__", "_in_use", "_pool", "_ref", "lease_id")

    def __init__(
        self,
        pool: EventLoopConnectionPool,
        lease_id: int,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self._pool = pool
        self._in_use = False
        self.lease_id = lease_id

        def lost(ref: LeaseRef) -> None:
            if ref in outstanding:
                outstanding.discard(ref)
                if on_lost is not None:
                    on_lost(lease_id)

        self._ref = LeaseRef(self, lost)

    # -- state (changed by the pool only: when it lends the lease, when it is back) --
    def mark_in_use(self) -> None:
        """Refuses: a lease is put in use only by a borrow, which waits its turn.

        Marking a lease in use by hand would skip the borrowers waiting before
        it and the pool's count of leases out, so this raises
        :class:`LeaseError` saying how to borrow instead.
        """
        if self._in_use:
            raise LeaseError(f"{self!r} is already in use")
        raise LeaseError(
            f"mark_in_use() cannot take {self!r}: a lease is put in use only by a borrow "
            f"('async with Neo4jConnectionFactory.borrow_connection()', or "
            f"'await GlobalNeo4jConnectionPool().borrow_connection()'), which waits its turn"
        )

    def mark_available(self, error: BaseException | None = None) -> None:
        """Return this lease to its pool: ``return_connection`` without the ``await``.

        It never waits. Pass the exception the holder ended with, if any (as
        for ``return_connection``). Raises :class:`LeaseError` if the lease
        was already returned, or when called off its event loop.
        """
        self._pool._return_nowait(self, error)

    @property
    def in_use(self) -> bool:
        """Whether a borrower holds this lease now."""
        return self._in_use

    @property
    def pool(self) -> EventLoopConnectionPool:
        """The pool of the event loop this lease belongs to."""
        return self._pool

    @property
    def loop_id(self) -> str:
        """The id of the event loop this lease belongs to."""
        return self._pool.loop_id

    @property
    def borrowed_at(self) -> str:
        """``file:line in function`` of the code that borrowed the lease ("" once returned)."""
        return self._pool.borrow_site(self.lease_id)

    # -- use --------------------------------------------------------------------
    async def get_driver(self) -> AsyncDriver:
        """The driver of this lease's event loop.

        Raises :class:`LeaseError` if the lease was returned or is used from
        another event loop, where the driver's sockets cannot work.
        """
        return self._driver_now()

    def _driver_now(self) -> AsyncDriver:
        """:meth:`get_driver` without the ``await``, for code that holds the lease."""
        pool = self._pool
        if self._in_use and _get_running_loop() is pool._loop is not None:  # the usual case
            return pool._current_driver()
        if not self._in_use:
            raise LeaseError(
                f"{self!r} was returned to its pool; borrow a new connection "
                f"instead of keeping a returned one"
            )
        self._pool._check_loop("use a lease")
        return self._pool._current_driver()

    def __repr__(self) -> str:
        state = "in use" if self._in_use else "available"
        return f"<PooledConnectionManager #{self.lease_id} of loop {self._pool.loop_id}, {state}>"


def caller_outside_package(frame: FrameType | None = None) -> BorrowSite | None:
    """The first frame outside neopool (and asyncio), from ``frame`` (default: the
    caller's) outwards: its code and line, formatted later.

    This runs on every borrow, so it keeps no frame (that would keep its locals
    alive) and builds no string; each code object is classified once.
    """
    if frame is None:
        frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        skipped = _skipped_code.get(code)
        if skipped is None:
            if len(_skipped_code) >= _MAX_CLASSIFIED:  # code made at run time, without end
                _skipped_code.clear()
            skipped = _skipped_code[code] = code.co_filename.startswith(_SKIPPED_DIRS)
        if not skipped:
            return code, frame.f_lineno
        frame = frame.f_back
    return None
