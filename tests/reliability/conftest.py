"""Shared helpers of the reliability suite."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir(f"/proc/{os.getpid()}/fd")) if os.path.isdir("/proc") else _psutil_fds()


def _psutil_fds() -> int:
    import psutil

    return int(psutil.Process().num_fds())


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds: for effects seen only by another process or thread."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def unraisable() -> Iterator[list[Any]]:
    """Every exception that escapes a finalizer during the test (there must be none)."""
    seen: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append((info.exc_type, info.exc_value, info.object))
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert not seen, f"exceptions escaped finalizers: {seen}"
