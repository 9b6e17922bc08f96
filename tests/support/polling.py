"""The suite's one way to wait for a condition: look again until it holds or time runs out.

For effects another thread, process or task brings about (a socket closed, a
proxy's count, a worker's stats), where there is no event to await. Both forms
return whether the condition held, so a test asserts it::

    assert eventually(lambda: proxy.active_connections == 0)
    assert await eventually_async(lambda: pool.waiting == 2)

Use :func:`eventually_async` in a coroutine: it lets the loop run between looks
(other tasks, callbacks, transports closing), which a blocking sleep would not.
The first few looks come without a pause, so conditions that need only a few
loop iterations are seen at once; after that, every :data:`INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

#: Seconds to wait for a condition unless a test says otherwise.
TIMEOUT = 10.0
#: Seconds between looks, after the first :data:`QUICK_LOOKS`.
INTERVAL = 0.01
#: Looks taken without a pause (yielding only), before pausing :data:`INTERVAL` each time.
QUICK_LOOKS = 20


def _pauses(timeout: float) -> Iterator[float]:
    """How long to pause before each next look, until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    looks = 0
    while (remaining := deadline - time.monotonic()) > 0:
        looks += 1
        yield 0.0 if looks <= QUICK_LOOKS else min(INTERVAL, remaining)


def eventually(condition: Callable[[], object], timeout: float = TIMEOUT) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (blocking this thread)."""
    for pause in _pauses(timeout):
        if condition():
            return True
        time.sleep(pause)
    return bool(condition())


async def eventually_async(condition: Callable[[], object], timeout: float = TIMEOUT) -> bool:
    """:func:`eventually` for coroutines: the running loop goes on between looks."""
    for pause in _pauses(timeout):
        if condition():
            return True
        await asyncio.sleep(pause)
    return bool(condition())
