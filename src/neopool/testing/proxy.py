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

Given a server-side ``ssl.SSLContext`` (``tls=``), the proxy terminates TLS
and forwards plaintext, so a plain Bolt server can be reached over
``bolt+ssc://``, ``neo4j+ssc://`` or ``bolt://`` with ``encrypted=True``; every
fault above still applies, to the TLS records (handshake included) as on a
real network. :class:`TlsProxy` does that with certificates of a throwaway CA
(:class:`~neopool.testing.tls.TlsCertificates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from neo4j import Address

from neopool._service import Service
from neopool.testing.tls import TlsCertificates

#: Bytes read per chunk, and bytes a direction may hold in flight before it stops reading.
_CHUNK = 64 * 1024
_MAX_IN_FLIGHT = 8 * 1024 * 1024
#: How long start() and stop() wait for the proxy's thread.
_THREAD_TIMEOUT = 10.0


class _Source(Protocol):
    """Where a pump reads: a stream reader, or the client-facing side of a TLS session."""

    async def read(self, n: int = -1) -> bytes: ...


class _Sink(Protocol):
    """Where a pump delivers: a stream writer, or the client-facing side of a TLS session."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


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
    tls: _TlsEnd | None = None
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


class _TlsEnd:
    """The server's end of one TLS session, in memory, in front of the plaintext upstream.

    The pumps take it for the upstream: the upward pump writes the client's
    ciphertext into it once the network delay is over, the downward pump reads
    the ciphertext for the client out of it before the delay. So latency,
    blackhole and cut act on TLS records, the handshake's included, where a
    real network would put them: between the client and the TLS endpoint.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        on_handshake: Callable[[], None],
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._session = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._upstream_reader = upstream_reader
        self._upstream = upstream
        self._on_handshake = on_handshake
        self.handshaken = asyncio.Event()
        self._readable = asyncio.Event()  # ciphertext waits for the client, or the session ended
        self._room = asyncio.Event()  # what waits for the client is below _MAX_IN_FLIGHT
        self._room.set()
        self._ended = False

    # -- the upward side: ciphertext in, plaintext to the upstream ---------------------
    def write(self, data: bytes) -> None:
        """Take the client's ciphertext; raises :class:`ssl.SSLError` if the session fails."""
        self._incoming.write(data)
        try:
            if not self.handshaken.is_set():
                self._session.do_handshake()
                self.handshaken.set()
                self._on_handshake()
            while plaintext := self._session.read(_CHUNK):
                self._upstream.write(plaintext)
            self._end()  # an empty read: the client said close_notify
        except ssl.SSLWantReadError:
            pass  # the rest of a record, or of the handshake, is still on its way
        except ssl.SSLError:  # a failed handshake, a bad record, close_notify (ZeroReturn)
            self._end()
            raise
        finally:
            self._produced()  # handshake replies and alerts go to the client

    async def drain(self) -> None:
        await self._upstream.drain()

    # -- the downward side: the upstream's plaintext in, ciphertext out ----------------
    async def encrypt(self) -> None:
        """Task: the upstream's plaintext into the session until either side ends."""
        await self.handshaken.wait()
        try:
            while not self._ended:
                await self._room.wait()
                plaintext = await self._upstream_reader.read(_CHUNK)
                if not plaintext:
                    with contextlib.suppress(ssl.SSLError):
                        self._session.unwrap()  # close_notify; the client's reply is not awaited
                    break
                self._session.write(plaintext)
                self._produced()
        except OSError:  # the upstream failed, or the session (ssl.SSLError is an OSError)
            pass
        finally:
            self._end()

    async def read(self, n: int = -1) -> bytes:
        """Ciphertext for the client; ``b""`` once the session ended and all was read."""
        while not self._outgoing.pending:
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._outgoing.read(n)
        if self._outgoing.pending < _MAX_IN_FLIGHT:
            self._room.set()
        return data

    def _produced(self) -> None:
        if self._outgoing.pending:
            self._readable.set()
            if self._outgoing.pending >= _MAX_IN_FLIGHT:
                self._room.clear()

    def _end(self) -> None:
        self._ended = True
        self._readable.set()


class TcpProxy(Service):
    """A real TCP proxy written with asyncio, running its own event loop in a daemon thread,
    so sync code, tests in any loop, and subprocesses can all go through it.

    Faults are switched on and off from any thread while traffic flows:
    :meth:`set_latency`, :meth:`cut_all`, :meth:`set_blackhole`. Bytes are
    counted per connection (:meth:`connection_stats`). It listens on loopback
    only.

    ``tls``: a server-side context (``ssl.Purpose.CLIENT_AUTH``, certificate
    loaded) makes the proxy terminate TLS and forward plaintext upstream. The
    faults then act on the encrypted bytes, the TLS handshake's included (so
    latency charges its round trips, and a blackhole stalls it), and the byte
    counts are of ciphertext, as on the wire; :attr:`tls_handshakes` counts
    the sessions that were set up.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rtt_ms: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if listen_host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"TcpProxy listens on loopback only, not on {listen_host!r}")
        if tls is not None and tls.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError(
                "tls must be a server-side context, e.g. "
                "ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) with load_cert_chain()"
            )
        self.tls = tls
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
        self._handshakes = 0

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
        faults = ["tls"] if self.tls is not None else []
        if self._delay:
            faults.append(f"rtt={self._delay * 2000:g}ms")
        if self._blackholed:
            faults.append("blackhole")
        return (
            f"<{type(self).__name__} 127.0.0.1:{self.port} -> "
            f"{self.upstream_host}:{self.upstream_port}"
            f"{' ' + ' '.join(faults) if faults else ''} active={self.active_connections}>"
        )

    # -- where clients connect ---------------------------------------------------------
    def uri(self, scheme: str | None = None) -> str:
        """``scheme://127.0.0.1:<port>``: give this to the driver instead of the server.

        The scheme defaults to ``bolt``, or to ``bolt+ssc`` (encrypted, any
        certificate accepted) when the proxy terminates TLS.
        """
        if scheme is None:
            scheme = "bolt" if self.tls is None else "bolt+ssc"
        return f"{scheme}://127.0.0.1:{self.port}"

    def resolver(self) -> Callable[[Address], list[Address]]:
        """A driver ``resolver=`` that sends every address the driver meets to this proxy.

        With a ``neo4j://`` scheme the driver connects where the server's routing
        table says, and a server names its own address there, which leads the
        driver around the proxy: ``AsyncGraphDatabase.driver(proxy.uri("neo4j+ssc"),
        auth=..., resolver=proxy.resolver())`` keeps every connection going through.
        """
        return lambda address: [Address(("127.0.0.1", self.port))]

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
    def tls_handshakes(self) -> int:
        """TLS sessions set up since start (always 0 without ``tls``)."""
        return self._handshakes

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
        """Per connection: ``id``, ``bytes_up``, ``bytes_down``, ``open`` (0/1), ``opened_at``,
        ``tls`` (1 once its TLS handshake completed, else 0).

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
                "tls": int(conn.tls is not None and conn.tls.handshaken.is_set()),
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
        source: _Source = upstream_reader
        sink: _Sink = upstream
        if self.tls is not None:  # the client's bytes are TLS; the upstream's are plain
            conn.tls = _TlsEnd(self.tls, upstream_reader, upstream, self._handshake_done)
            source = sink = conn.tls
            conn.tasks.add(asyncio.ensure_future(conn.tls.encrypt()))
        up = asyncio.ensure_future(
            self._pump(conn, client_reader, sink, upward=True, sent_from=established)
        )
        down = asyncio.ensure_future(self._pump(conn, source, conn.client, upward=False))
        conn.tasks.update((up, down))
        # One direction ending ends the connection: Bolt never half-closes.
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)

    def _handshake_done(self) -> None:
        self._handshakes += 1

    async def _pump(
        self,
        conn: _Connection,
        reader: _Source,
        writer: _Sink,
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
        writer: _Sink,
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
            except OSError:  # ssl.SSLError too: a failed TLS session ends the connection
                return
            if upward:
                conn.bytes_up += len(chunk)
            else:
                conn.bytes_down += len(chunk)


class TlsProxy(TcpProxy):
    """A :class:`TcpProxy` that terminates TLS with the server certificate of ``certificates``.

    The upstream still gets plaintext. :meth:`uri` defaults to ``bolt+ssc://``
    (encrypted, any certificate); a driver that verifies uses ``bolt://`` (or
    ``neo4j://``) with :meth:`driver_options`, which trust :attr:`ca_path`.
    ``certificates`` must be started, and outlive the proxy.
    ``client_certificates=True``: mutual TLS, only clients presenting a
    certificate of the same CA (:meth:`TlsCertificates.client_certificate`) get through.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        certificates: TlsCertificates,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rtt_ms: float = 0.0,
        client_certificates: bool = False,
    ) -> None:
        super().__init__(
            upstream_host,
            upstream_port,
            listen_host=listen_host,
            listen_port=listen_port,
            rtt_ms=rtt_ms,
            tls=certificates.server_context(require_client_certificate=client_certificates),
        )
        self.certificates = certificates

    @property
    def ca_path(self) -> Path:
        """The PEM file of the CA that signed the proxy's certificate."""
        return self.certificates.ca_path

    def driver_options(self) -> dict[str, Any]:
        """``encrypted=True`` and ``trusted_certificates=TrustCustomCAs(ca_path)``, for
        ``bolt://`` and ``neo4j://`` (the ``+s``/``+ssc`` schemes refuse them)."""
        return self.certificates.driver_options()
