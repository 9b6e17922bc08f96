"""Throwaway TLS certificates, so the driver can be tested over TLS on this machine.

The embedded Bolt server speaks plain TCP only. A :class:`~neopool.testing.TcpProxy`
given a server-side ``ssl.SSLContext`` terminates TLS in front of it; this
module makes what that needs: a certificate authority that exists for one test
session only (made with ``trustme``) and a certificate it signed for
``127.0.0.1`` and ``localhost``, written as PEM files into a private temporary
directory (``tempfile.mkdtemp``, mode 0700), removed again by :meth:`TlsCertificates.end`.

>>> with TlsCertificates() as certs:                         # doctest: +SKIP
...     with TcpProxy("127.0.0.1", 7687, tls=certs.server_context()) as proxy:
...         AsyncGraphDatabase.driver(proxy.uri("bolt+ssc"), ...)   # any certificate
...         AsyncGraphDatabase.driver(proxy.uri("bolt"), ..., **certs.driver_options())

How the official driver takes each kind of URI:

* ``bolt+ssc://`` / ``neo4j+ssc://``: encrypted, any certificate accepted; nothing else to pass.
* ``bolt+s://`` / ``neo4j+s://``: encrypted, verified against the *system* CAs only,
  so a throwaway CA is refused (and these schemes refuse ``trusted_certificates``).
* ``bolt://`` / ``neo4j://`` with ``encrypted=True,
  trusted_certificates=neo4j.TrustCustomCAs(ca_path)`` (:meth:`TlsCertificates.driver_options`):
  encrypted, verified against this CA, host name checked. neopool's config says
  the same as ``Neo4jConnectionConfig(uri="bolt://...", trusted_certificates=[ca_path])``.

Mutual TLS: :meth:`TlsCertificates.client_certificate` issues a client
certificate signed by the same CA, and ``TlsProxy(..., client_certificates=True)``
(a :meth:`TlsCertificates.server_context` that requires one) turns away clients
without it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neo4j import TrustCustomCAs

from neopool._service import Service

#: What the server certificate is valid for, unless told otherwise.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def server_context(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str] | None = None,
    *,
    client_ca_path: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A server-side context presenting the certificate chain in ``cert_path``.

    ``key_path`` is the private key's PEM file; ``None`` when ``cert_path``
    holds the key too. ``client_ca_path``: require a client certificate
    signed by that CA (mutual TLS).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    if client_ca_path is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=os.fspath(client_ca_path))
    return context


class TlsCertificates(Service):
    """A throwaway CA and a server certificate it signed, as PEM files in a private temp dir.

    :meth:`start` makes them (a new CA every time), :meth:`end` removes the
    directory. Paths: :attr:`ca_path` (what a client trusts), :attr:`cert_path`
    (the server's certificate chain), :attr:`key_path` (its private key, mode 0600).
    """

    def __init__(self, hosts: Sequence[str] = DEFAULT_HOSTS) -> None:
        if not hosts:
            raise ValueError("the certificate needs at least one host name or IP address")
        self.hosts = tuple(hosts)
        self._directory: Path | None = None
        self._authority: Any = None
        self._clients = itertools.count(1)

    def start(self) -> TlsCertificates:
        """Make the CA, the server certificate and their files; returns once they exist."""
        if self._directory is not None:
            return self
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - trustme is in the dev extra
            raise RuntimeError(
                "TlsCertificates needs trustme: pip install trustme (or neopool[dev])"
            ) from exc
        authority = trustme.CA(organization_name="neopool throwaway test CA")
        leaf = authority.issue_cert(*self.hosts)
        directory = Path(tempfile.mkdtemp(prefix="neopool-tls-"))
        try:
            os.chmod(directory, 0o700)  # mkdtemp's mode already; said here, not assumed
            _write(directory / "ca.pem", authority.cert_pem.bytes())
            _write(directory / "cert.pem", b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            _write(directory / "key.pem", leaf.private_key_pem.bytes())
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._directory = directory
        self._authority = authority
        return self

    def end(self) -> None:
        """Remove the directory and every file in it."""
        self._authority = None
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    stop = end

    # -- the files ---------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        """The private directory holding the files (mode 0700)."""
        if self._directory is None:
            raise RuntimeError("TlsCertificates is not started: use start() or `with`")
        return self._directory

    @property
    def ca_path(self) -> Path:
        """The CA certificate (PEM): what a client trusts, e.g. ``TrustCustomCAs(str(ca_path))``."""
        return self.directory / "ca.pem"

    @property
    def cert_path(self) -> Path:
        """The server certificate chain (PEM), for ``127.0.0.1`` and ``localhost`` by default."""
        return self.directory / "cert.pem"

    @property
    def key_path(self) -> Path:
        """The server certificate's private key (PEM, mode 0600)."""
        return self.directory / "key.pem"

    def client_certificate(
        self, name: str = "neopool-client", *, key_password: str | None = None
    ) -> tuple[Path, Path]:
        """Issue a client certificate for mutual TLS, signed by this CA.

        Returns the PEM files ``(certificate, key)``, new ones in the private
        directory on every call; with ``key_password`` the key is encrypted
        with it (PKCS#8), as ``client_key_password`` expects.
        """
        authority = self._authority
        if authority is None:
            raise RuntimeError("TlsCertificates is not started: use start() or `with`")
        leaf = authority.issue_cert(name)
        key = leaf.private_key_pem.bytes()
        if key_password is not None:
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_private_key(key, None).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(key_password.encode()),
            )
        number = next(self._clients)
        cert_path = self.directory / f"client-{number}.pem"
        key_path = self.directory / f"client-{number}-key.pem"
        _write(cert_path, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        _write(key_path, key)
        return cert_path, key_path

    # -- using them --------------------------------------------------------------------
    def server_context(self, *, require_client_certificate: bool = False) -> ssl.SSLContext:
        """A server-side context presenting the certificate: give it to ``TcpProxy(tls=...)``.

        ``require_client_certificate``: mutual TLS, a client must present a
        certificate this CA signed (:meth:`client_certificate`).
        """
        client_ca = self.ca_path if require_client_certificate else None
        return server_context(self.cert_path, self.key_path, client_ca_path=client_ca)

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that trusts this CA only (host names checked)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def driver_options(self) -> dict[str, Any]:
        """Options for a ``bolt://`` or ``neo4j://`` driver to go encrypted and trust this CA.

        ``AsyncGraphDatabase.driver(proxy.uri("bolt"), auth=..., **certs.driver_options())``;
        the ``+s`` and ``+ssc`` schemes refuse these options.
        """
        return {"encrypted": True, "trusted_certificates": TrustCustomCAs(str(self.ca_path))}

    def __repr__(self) -> str:
        where = str(self._directory) if self._directory is not None else "not started"
        return f"<TlsCertificates {', '.join(self.hosts)} in {where}>"


def _write(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) readable by its owner only, and write ``data``."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
