"""What a forked child does with what it inherited: one hook, in a fixed order.

Celery's prefork pool forks worker processes from a parent that may hold loops,
pools and drivers. The child must start empty, never send a byte on a socket it
inherited (it is still the parent's), and never close an inherited loop (that
would unregister the parent's descriptors from the epoll instance they share).

Order matters: the registry first (its pools are terminated: the child's copies
of their sockets released, nothing sent), then the runner (the parent's loops are
forgotten and kept, never closed), then the database cache (preparations running
in the parent's threads will never finish here).
"""

from __future__ import annotations

import logging
import os
import threading

from neopool import runner
from neopool.database import preparer
from neopool.registry import GlobalNeo4jConnectionPool

logger = logging.getLogger("neopool")


def _before_fork() -> None:
    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry.before_fork()


def _after_fork_in_parent() -> None:
    registry = GlobalNeo4jConnectionPool._instance
    if registry is not None:
        registry.after_fork_in_parent()


def _after_fork_in_child() -> None:
    GlobalNeo4jConnectionPool._instance_lock = threading.Lock()
    registry = GlobalNeo4jConnectionPool._instance
    steps = [runner.after_fork_in_child, preparer.after_fork_in_child]
    if registry is not None:
        steps.insert(0, registry.after_fork_in_child)
    for step in steps:  # each one, whatever an earlier one raised: a child must not inherit locks
        try:
            step()
        except Exception:
            logger.exception("neopool: after fork, %s failed", step.__qualname__)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
