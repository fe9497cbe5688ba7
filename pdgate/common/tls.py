"""TLS contexts for pdgate's own HTTP server and client (docs/tls.md).

* :class:`ServerTls`: the server side. A certificate chain and its key, TLS 1.2 or newer,
  ALPN ``http/1.1``. With a client CA the server asks every client for a certificate but lets
  one without a certificate in (``CERT_OPTIONAL``): routes that need one (the gateway's admin
  API) check :attr:`pdgate.common.http_server.Responder.peer_certificate` themselves. A client
  that does send a certificate the CA did not sign fails the handshake.
  :meth:`ServerTls.reload` reads the certificate and key again into the *same* context, so the
  next handshake serves the new certificate while connections already open keep theirs; files
  that do not load (or do not match) leave the context as it was.
* :func:`client_context`: the client side, for engines served over ``https://``. Verification
  is always on and the host name is checked; the CA bundle is the configured file or the
  system's trust store; an optional client certificate for engines that require one (mTLS).

Every failure to read or use a file is a :class:`TlsError` whose message names the file. A key
protected by a passphrase is refused (a server must never stop to prompt for one).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = ssl.TLSVersion.TLSv1_2
ALPN_PROTOCOLS = ("http/1.1",)


class TlsError(OSError):
    """A certificate, key or CA file that cannot be read or used; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerTlsFiles:
    """What a TLS server serves with: a PEM certificate chain, its unencrypted PEM key, and
    optionally a PEM CA bundle that client certificates are verified against."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ClientTlsFiles:
    """What a TLS client trusts and presents: a PEM CA bundle (None: the system's trust store)
    and optionally a client certificate chain with its key (both or neither)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def configured(self) -> bool:
        """Whether any file is given (otherwise the defaults apply)."""
        return any((self.ca_file, self.cert_file, self.key_file))


def _check_file(path: str, what: str) -> None:
    """Raise :class:`TlsError` unless ``path`` is a readable file."""
    file = Path(path)
    try:
        if not file.is_file():
            raise TlsError(f"{what} {path!r} does not exist or is not a file")
        with file.open("rb"):
            pass
    except OSError as exc:  # (is_file() too raises for a name the file system refuses: too long)
        raise TlsError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None


def _refuse_passphrase() -> bytes:
    """OpenSSL's passphrase callback: never prompt (raising makes the load fail)."""
    raise TlsError("the private key is encrypted; give an unencrypted PEM key")


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load a certificate chain and its key into ``context``; :class:`TlsError` when they do not load."""
    _check_file(cert_file, "certificate file")
    _check_file(key_file, "key file")
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except TlsError as exc:
        raise TlsError(f"key file {key_file!r}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot use certificate {cert_file!r} with key {key_file!r} (a PEM certificate chain and "
            f"its unencrypted PEM private key are expected): {_reason(exc)}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str, what: str) -> None:
    """Trust the PEM CA bundle ``ca_file`` in ``context``; :class:`TlsError` when it does not load."""
    _check_file(ca_file, what)
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{what} {ca_file!r} is not a PEM CA bundle: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.library or 'SSL'}: {exc.reason}"
    return exc.strerror or str(exc)


def server_context(files: ServerTlsFiles, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """A new server context for ``files`` (see the module doc); :class:`TlsError` when a file is bad.

    With ``files.client_ca_file``, clients are asked for a certificate; one is optional unless
    ``require_client_cert`` (then a client without a CA-signed certificate fails the handshake).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    _load_chain(context, files.cert_file, files.key_file)
    if files.client_ca_file is not None:
        _load_ca(context, files.client_ca_file, "client CA file")
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TlsError("requiring client certificates needs a client CA file to verify them against")
    return context


def client_context(files: ClientTlsFiles) -> ssl.SSLContext:
    """A new client context for ``https://`` upstreams: verification on, host names checked,
    trusting ``files.ca_file`` (else the system's trust store), presenting ``files``' client
    certificate when given. :class:`TlsError` when a file is bad or only one of cert and key is given."""
    if (files.cert_file is None) != (files.key_file is None):
        raise TlsError("a client certificate needs both its certificate file and its key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = MIN_VERSION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    if files.ca_file is not None:
        _load_ca(context, files.ca_file, "CA file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if files.cert_file is not None and files.key_file is not None:
        _load_chain(context, files.cert_file, files.key_file)
    return context


class ServerTls:
    """A server context whose certificate can be replaced while it serves (SIGHUP).

    :attr:`context` is what the listener is given; each handshake is handed over (its SNI callback,
    called for every ClientHello, with or without a server name) to :attr:`current`, a whole context
    built from the files. A reload builds a new one, so the new certificate replaces the old one
    whatever its key type (loading it into the live context would keep an old certificate of
    another key type beside it).
    """

    def __init__(self, files: ServerTlsFiles) -> None:
        """Build the contexts; :class:`TlsError` when a file is bad."""
        self.files = files
        self.current = server_context(files)
        self.context = server_context(files)
        self.context.sni_callback = self._hand_over
        self.reloads = 0

    def _hand_over(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self.current

    def reload(self) -> None:
        """Read the certificate chain and key files again: new handshakes serve them, open
        connections keep the certificate they were made with. Files that are missing, malformed or
        do not match each other raise :class:`TlsError` and change nothing. (The client CA is not
        re-read: a new one needs a restart.)
        """
        self.current = server_context(self.files)
        self.reloads += 1
