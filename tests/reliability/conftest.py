"""Shared helpers of the reliability suite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from neopool import Neo4jConnectionConfig
from neopool.runner import close_all_loops
from neopool.testing import TcpProxy

# The suite's one polling helper (tests/support/polling.py), re-exported for the modules that
# import it from here (test_release_matrix.py).
from polling import eventually

__all__ = ["eventually", "open_fds"]


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir(f"/proc/{os.getpid()}/fd")) if os.path.isdir("/proc") else _psutil_fds()


def _psutil_fds() -> int:
    import psutil

    return int(psutil.Process().num_fds())


@pytest.fixture
def proxied_config(
    configure: Callable[..., Neo4jConnectionConfig], neopool_proxy: TcpProxy
) -> Iterator[Neo4jConnectionConfig]:
    """The registry configured through ``neopool_proxy``, so the server's view of sockets
    can be seen: two warm sockets per loop, closes bounded at 2 s.

    Afterwards the runner's loops are closed, then the registry is reset.
    """
    yield configure(uri=neopool_proxy.uri(), pool_min_size=2, close_timeout=2.0)
    close_all_loops(10)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A real plain TCP echo server on this test's loop (a proxy's upstream)."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
