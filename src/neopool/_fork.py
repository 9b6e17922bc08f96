"""What a forked child does with what it inherited: one hook, its steps in a fixed order.

Celery's prefork pool forks worker processes from a parent that may hold loops,
pools and drivers. The child must start empty, never send a byte on a socket it
inherited (it is still the parent's), and never close an inherited loop (that
would unregister the parent's descriptors from the epoll instance they share).

This module registers the process's one ``os.register_at_fork`` hook. The modules
that keep process-wide state add their own step to it (:func:`add_step`), and the
steps run in the order of :class:`Step`, whatever order the modules were imported
in: the registry first (its pools terminated: the child's copies of their sockets
released, nothing sent), then the runner (the parent's loops forgotten and kept,
never closed), then the database cache (preparations running in the parent's
threads will never finish here), then LightRAG's shared state, then the metrics
collectors' lock. Every step runs, whatever an earlier one raised: a child must
not inherit a lock held.

It imports nothing of neopool's, so any module can add its step at import.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable

logger = logging.getLogger("neopool")


class Step(enum.IntEnum):
    """The fork hook's steps, in the order they run."""

    #: The registry: the process totals from zero, every inherited pool terminated,
    #: without a byte sent.
    POOLS = 1
    #: The runner: the parent's loops forgotten (kept, never closed), its calls not ours.
    LOOPS = 2
    #: The database cache: preparations running in the parent's threads dropped.
    DATABASE = 3
    #: LightRAG's shared state (full-text index cache, dropped-storage report).
    LIGHTRAG = 4
    #: The Prometheus collectors registered (neopool.metrics): a lock of its own.
    METRICS = 5


_Hook = Callable[[], None]
#: Per step: (before fork, after fork in the parent, after fork in the child).
_steps: dict[Step, tuple[_Hook | None, _Hook | None, _Hook]] = {}


def add_step(
    step: Step,
    in_child: _Hook,
    *,
    before: _Hook | None = None,
    in_parent: _Hook | None = None,
) -> None:
    """Run ``in_child`` in a forked child at ``step``'s place (``before`` the fork, and
    ``in_parent`` after it, likewise). A step added again replaces the earlier one."""
    _steps[step] = (before, in_parent, in_child)


def steps() -> list[Step]:
    """The steps added so far, in the order they run."""
    return sorted(_steps)


def _run(which: int, order: list[Step]) -> None:
    for step in order:
        hook = _steps[step][which]
        if hook is None:
            continue
        try:
            hook()
        except Exception:
            logger.exception("neopool: at fork, step %s (%s) failed", step.name, hook.__qualname__)


def _before_fork() -> None:
    _run(0, steps())


def _after_fork_in_parent() -> None:
    _run(1, steps()[::-1])  # what was taken before the fork is let go in reverse


def _after_fork_in_child() -> None:
    _run(2, steps())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
