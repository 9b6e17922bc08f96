"""What a loop pool reports about itself, and when it warns."""

from __future__ import annotations

import logging
from typing import TypedDict

logger = logging.getLogger("neopool")


class PoolStats(TypedDict):
    """A snapshot of one event loop's pool.

    The first four keys are the design note's; the rest say how the pool has
    been used since it was created.
    """

    available: int  #: leases ready to hand out
    in_use: int  #: leases held by borrowers
    total: int  #: available + in_use (<= max_size)
    max_size: int  #: pool_max_size
    min_size: int  #: pool_min_size
    waiting: int  #: borrowers waiting for a lease now
    borrows: int  #: leases handed out, ever
    timeouts: int  #: borrowers that gave up with PoolTimeout
    drivers_created: int  #: drivers this loop has created (1 unless replaced)
    wait_ms_total: float  #: time borrowers spent waiting, summed
    max_wait_ms: float  #: the longest single wait
    reuse_ratio: float  #: borrows served without creating a driver, as a fraction
    thread: str  #: name of the thread running the loop
    closed: bool  #: whether the pool was closed


class UtilisationMonitor:
    """Logs once when a pool crosses its utilisation threshold or runs dry.

    It re-arms only after utilisation falls back, so a busy pool logs one line
    per episode rather than one per borrow.
    """

    __slots__ = ("_above", "_exhausted", "_loop_id", "_threshold")

    def __init__(self, loop_id: str, threshold: float) -> None:
        self._loop_id = loop_id
        self._threshold = threshold
        self._above = False
        self._exhausted = False

    def observe(self, in_use: int, max_size: int) -> None:
        """Called after every borrow and return with the new figures."""
        above = in_use > self._threshold * max_size
        if above and not self._above:
            logger.warning(
                "neopool: high utilisation on event loop %s: %d of %d leases in use (%.0f%%)",
                self._loop_id,
                in_use,
                max_size,
                100.0 * in_use / max_size,
            )
        self._above = above
        if in_use < max_size:
            self._exhausted = False

    def exhausted(self, max_size: int, waiting: int) -> None:
        """Called when a borrower has to wait because every lease is out."""
        if not self._exhausted:
            self._exhausted = True
            logger.warning(
                "neopool: pool exhausted on event loop %s: all %d leases in use, "
                "%d borrower(s) waiting; consider raising pool_max_size",
                self._loop_id,
                max_size,
                waiting,
            )
