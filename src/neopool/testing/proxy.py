"""A real TCP proxy that can misbehave on purpose: cut, blackhole, slow down.

Faults that matter to a connection pool happen on the network, between the
driver and the server. Putting a real proxy there (rather than mocking the
driver) tests what production meets: the driver's own timeouts, half-read
messages, sockets that die mid-query. The proxy runs its own event loop in a
daemon thread, so sync code, tests on any loop, and subprocesses can all go
through it, and a test's loop never has to run it.

>>> with TcpProxy("127.0.0.1", 7687) as proxy:        # doctest: +SKIP
...     config = Neo4jConnectionConfig(uri=proxy.uri(), ...)
...     proxy.set_latency(200)      # 100 ms each way
...     proxy.cut_all()             # every connection dies now
...     proxy.set_blackhole(True)   # accepts, never answers
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from neopool._service import Service

#: Bytes read per chunk, and bytes a direction may hold in flight before it stops reading.
_CHUNK = 64 * 1024
_MAX_IN_FLIGHT = 8 * 1024 * 1024
#: How long start() and stop() wait for the proxy's thread.
_THREAD_TIMEOUT = 10.0


@dataclass(eq=False)
class _Connection:
    """One client connection and its upstream twin, as the proxy loop sees them."""

    id: int
    opened_at: float
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    open: bool = True
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def abort(self) -> None:
        """Drop both sides at once (a reset, not a polite goodbye)."""
        self.open = False
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    def finish(self) -> None:
        """End both sides after what was written is flushed (one side said goodbye)."""
        self.open = False
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class _DelayLine:
    """A FIFO of chunks, each released at its own time: latency without serialising.

    Every chunk is stamped with ``read time + delay`` when it arrives, so a
    stream keeps its throughput and its byte order; only its timing shifts.
    """

    def __init__(self) -> None:
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._in_flight = 0
        self.ended = False

    def put(self, due: float, chunk: bytes) -> None:
        self._chunks.append((due, chunk))
        self._in_flight += len(chunk)
        if self._in_flight >= _MAX_IN_FLIGHT:
            self._room.clear()
        self._arrived.set()

    def end(self) -> None:
        self.ended = True
        self._arrived.set()

    async def room(self) -> None:
        await self._room.wait()

    async def get(self) -> tuple[float, bytes] | None:
        """The next chunk, or ``None`` once the sender ended and all was delivered."""
        while not self._chunks:
            if self.ended:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        due, chunk = self._chunks.popleft()
        self._in_flight -= len(chunk)
        if self._in_flight < _MAX_IN_FLIGHT:
            self._room.set()
        return due, chunk


class TcpProxy(Service):
    """A real TCP proxy written with asyncio, running its own event loop in a daemon thread,
    so sync code, tests in any loop, and subprocesses can all go through it.

    Faults are switched on and off from any thread while traffic flows:
    :meth:`set_latency`, :meth:`cut_all`, :meth:`set_blackhole`. Bytes are
    counted per connection (:meth:`connection_stats`). It listens on loopback
    only.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rtt_ms: float = 0.0,
    ) -> None:
        if listen_host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"TcpProxy listens on loopback only, not on {listen_host!r}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = listen_port
        self._delay = 0.0
        self.set_latency(rtt_ms)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None  # cleared while blackholed
        self._blackholed = False
        self._connections: list[_Connection] = []
        self._ids = itertools.count(1)
        self._opened = 0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> TcpProxy:
        """Start listening; returns once connections are accepted."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name=f"neopool-proxy-{id(self):x}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_THREAD_TIMEOUT):
            raise RuntimeError("the TCP proxy did not start listening in time")
        if failure:
            self._thread.join(_THREAD_TIMEOUT)
            self._thread = None
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shut_down())
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        if not self._blackholed:
            self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shut_down(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        pending = [task for conn in self._connections for task in conn.tasks]
        await asyncio.gather(*pending, return_exceptions=True)

    def stop(self) -> None:
        """Close every connection and stop listening."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_THREAD_TIMEOUT)
        self._thread = None
        self._loop = None

    end = stop

    def __repr__(self) -> str:
        faults = []
        if self._delay:
            faults.append(f"rtt={self._delay * 2000:g}ms")
        if self._blackholed:
            faults.append("blackhole")
        return (
            f"<TcpProxy 127.0.0.1:{self.port} -> {self.upstream_host}:{self.upstream_port}"
            f"{' ' + ' '.join(faults) if faults else ''} active={self.active_connections}>"
        )

    # -- where clients connect ---------------------------------------------------------
    def uri(self, scheme: str = "bolt") -> str:
        """``scheme://127.0.0.1:<port>``: give this to the driver instead of the server."""
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- faults ------------------------------------------------------------------------
    def set_latency(self, rtt_ms: float) -> None:
        """Delay every byte by ``rtt_ms / 2`` in each direction (byte order kept).

        A connection opened while latency is on also pays one round trip for
        set-up, as TCP's handshake does on a real network: what the client sends
        first reaches the server no sooner than 1.5 round trips after it connected.
        """
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, not {rtt_ms!r}")
        self._delay = rtt_ms / 2000.0

    def cut_all(self) -> int:
        """Close every open connection, both sides, now; return how many were cut."""
        return self._call(self._cut_all)

    def _cut_all(self) -> int:
        cut = 0
        for conn in self._connections:
            if conn.open:
                conn.abort()
                cut += 1
        return cut

    def set_blackhole(self, on: bool) -> None:
        """While on, accept connections but forward and answer nothing, on old ones too."""
        self._blackholed = on
        self._call(self._apply_blackhole)

    def _apply_blackhole(self) -> int:
        assert self._flowing is not None
        if self._blackholed:
            self._flowing.clear()
        else:
            self._flowing.set()
        return 0

    def _call(self, function: object) -> int:
        """Run ``function`` on the proxy's loop and wait for its result."""
        loop = self._loop
        if loop is None or self._thread is None:
            return 0

        async def call() -> int:
            return function()  # type: ignore[operator, no-any-return]

        return asyncio.run_coroutine_threadsafe(call(), loop).result(_THREAD_TIMEOUT)

    # -- figures -----------------------------------------------------------------------
    @property
    def connections_opened(self) -> int:
        """Connections accepted since start."""
        return self._opened

    @property
    def active_connections(self) -> int:
        """Connections open now."""
        return sum(1 for conn in list(self._connections) if conn.open)

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> server, over every connection."""
        return sum(c.bytes_up for c in list(self._connections))

    @property
    def bytes_down(self) -> int:
        """Bytes delivered server -> client, over every connection."""
        return sum(c.bytes_down for c in list(self._connections))

    def connection_stats(self) -> list[dict[str, int | float]]:
        """Per connection: ``id``, ``bytes_up``, ``bytes_down``, ``open`` (0/1), ``opened_at``.

        ``opened_at`` is ``time.monotonic()`` at accept. Closed connections stay
        listed, so a test can see what every connection carried.
        """
        return [
            {
                "id": conn.id,
                "bytes_up": conn.bytes_up,
                "bytes_down": conn.bytes_down,
                "open": int(conn.open),
                "opened_at": conn.opened_at,
            }
            for conn in list(self._connections)
        ]

    # -- the traffic -------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Connecting to this proxy is instant; on the network it stands for, the
        # client could send nothing until the handshake's round trip was over.
        established = asyncio.get_running_loop().time() + 2 * self._delay
        conn = _Connection(next(self._ids), time.monotonic(), writer)
        self._opened += 1
        self._connections.append(conn)
        task = asyncio.current_task()
        assert task is not None
        conn.tasks.add(task)
        try:
            await self._serve(conn, reader, established)
        except asyncio.CancelledError:
            pass  # cut: abort() already dropped both sides
        finally:
            if conn.open:
                conn.finish()

    async def _serve(
        self, conn: _Connection, client_reader: asyncio.StreamReader, established: float
    ) -> None:
        assert self._flowing is not None
        if not self._flowing.is_set():  # a blackhole accepts, then says nothing
            await self._flowing.wait()
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            return  # nothing listens upstream: the client sees the connection end
        conn.upstream = upstream
        if not conn.open:
            upstream.transport.abort()
            return
        up = asyncio.ensure_future(
            self._pump(conn, client_reader, upstream, upward=True, sent_from=established)
        )
        down = asyncio.ensure_future(self._pump(conn, upstream_reader, conn.client, upward=False))
        conn.tasks.update((up, down))
        # One direction ending ends the connection: Bolt never half-closes.
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)

    async def _pump(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upward: bool,
        sent_from: float = 0.0,
    ) -> None:
        """Read one direction into a delay line; nothing counts as sent before ``sent_from``."""
        line = _DelayLine()
        deliver = asyncio.ensure_future(self._deliver(conn, line, writer, upward=upward))
        conn.tasks.add(deliver)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await line.room()
                try:
                    chunk = await reader.read(_CHUNK)
                except OSError:
                    break
                if not chunk:
                    break
                line.put(max(loop.time(), sent_from) + self._delay, chunk)
            line.end()
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(
        self,
        conn: _Connection,
        line: _DelayLine,
        writer: asyncio.StreamWriter,
        *,
        upward: bool,
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            item = await line.get()
            if item is None:
                return
            due, chunk = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self._flowing.is_set():
                await self._flowing.wait()
            try:
                writer.write(chunk)
                await writer.drain()
            except OSError:
                return
            if upward:
                conn.bytes_up += len(chunk)
            else:
                conn.bytes_down += len(chunk)
