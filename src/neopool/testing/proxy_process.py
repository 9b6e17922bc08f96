"""The latency proxy in a process of its own, for measurements.

:class:`~neopool.testing.TcpProxy` runs in a thread of the process that uses
it, which is what fault tests want: they switch faults on and off in between
two lines. A benchmark wants the opposite: the network it stands in for must
not share the interpreter (and its GIL) with the code being timed, or every
connection the proxy opens or tears down would show up as time spent by
whatever ran next. :class:`ProxyProcess` runs ``neopool proxy`` as a child.
"""

from __future__ import annotations

import os
import subprocess
import sys

from neopool._service import Service

#: The first line ``neopool proxy`` prints, before ``127.0.0.1:<port>``.
LISTENING = "listening on "
#: Seconds to wait for the child to stop before killing it.
_STOP_TIMEOUT = 10.0


class ProxyProcess(Service):
    """``neopool proxy HOST:PORT --rtt-ms N`` as a child process, listening on loopback.

    ``tls_cert`` (and ``tls_key``, unless the key is in the same file): PEM
    files to terminate TLS with, e.g. ``TlsCertificates().cert_path`` / ``.key_path``;
    the upstream still gets plaintext.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        rtt_ms: float = 0.0,
        listen_port: int = 0,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, not {rtt_ms!r}")
        if tls_key is not None and tls_cert is None:
            raise ValueError("tls_key needs tls_cert")
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.rtt_ms = rtt_ms
        self.port = listen_port
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        """Start the child; returns once it listens (its first line says where)."""
        if self._process is not None:
            return self
        command = [
            sys.executable,
            "-m",
            "neopool.cli",
            "proxy",
            f"{self.upstream_host}:{self.upstream_port}",
            "--rtt-ms",
            repr(self.rtt_ms),
            "--port",
            str(self.port),
        ]
        if self.tls_cert is not None:
            command += ["--tls-cert", os.fspath(self.tls_cert)]
        if self.tls_key is not None:
            command += ["--tls-key", os.fspath(self.tls_key)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        first = process.stdout.readline()  # ends at once, empty, if the child failed
        if not first.startswith(LISTENING):
            process.kill()
            process.wait()
            process.stdout.close()
            raise RuntimeError(
                f"the proxy process did not start (exit code {process.returncode}); "
                f"its error output is above"
            )
        self.port = int(first.rsplit(":", 1)[1])
        self._process = process
        return self

    def uri(self, scheme: str | None = None) -> str:
        """``scheme://127.0.0.1:<port>``: give this to the driver instead of the server.

        The scheme defaults to ``bolt``, or to ``bolt+ssc`` when the child terminates TLS.
        """
        if scheme is None:
            scheme = "bolt" if self.tls_cert is None else "bolt+ssc"
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL if it does not end in time)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    end = stop

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self._process is not None else "stopped"
        return (
            f"<ProxyProcess 127.0.0.1:{self.port} -> {self.upstream_host}:{self.upstream_port} "
            f"rtt={self.rtt_ms:g}ms{' tls' if self.tls_cert is not None else ''} {state}>"
        )
