"""The runner's two modes, for tests that run in each: a loop per thread, or the process loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from neopool import runner

#: The ``params`` of a fixture that runs each test in both modes.
MODES = ["thread", "process"]


@contextlib.contextmanager
def runner_in_mode(mode: str) -> Iterator[str]:
    """The runner in ``mode`` (one of :data:`MODES`); after it, a loop per thread, none open."""
    runner.use_process_loop(mode == "process")
    try:
        yield mode
    finally:
        runner.use_process_loop(False)
        runner.close_all_loops(5)
