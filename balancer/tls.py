"""TLS with the standard library's `ssl`: certificates and contexts.

- Certificates: a listener's certificate/key pairs become one `ssl.SSLContext` each; the first
  is the default and the others are chosen by the server name the client asks for (SNI),
  matched against each certificate's DNS names (subjectAltName, wildcards as TLS allows: one
  leftmost label). Files are read once per (re)load, as bytes, and travel in the Config
  (workers get them pickled): the key never needs to be re-read from disk by a worker.
- Termination is terminate.py: the accept stage that runs the handshake. The data path's TLS,
  both ways, is tlsstream.py's transport (it can half-close; the loops' own cannot).
- Servers: `client_context()` is what connects to a TLS upstream (proxy, pools, checks) use;
  active checks keep the loop's TLS (they never half-close).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tlsconfig import ListenerTlsConfig, UpstreamTlsConfig

log = logging.getLogger("balancer.tls")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class PemError(ValueError):
    """A certificate or key that cannot be used; `field` says which file is at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@contextlib.contextmanager
def pem_path(data: bytes) -> Iterator[str]:
    """A path the `ssl` module can load `data` from: `ssl` only loads chains from files.

    An anonymous in-memory file where Linux has them (the key never touches a disk again),
    else a private temporary file removed at once.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("balancer-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="balancer-", suffix=".pem") as handle:
        handle.write(data)
        handle.flush()
        yield handle.name


def certificate_names(cert_pem: bytes) -> tuple[str, ...]:
    """The DNS names a certificate is valid for: its subjectAltName, else its common name."""
    with pem_path(cert_pem) as path:
        try:
            # The one stdlib way to decode a certificate file; it exists since Python 2.7.
            decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        except (ssl.SSLError, ValueError):
            raise PemError("cert", "not a PEM certificate") from None
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [value.lower() for key, value in rdn if key == "commonName"]
    return tuple(names)


def _load_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with pem_path(cert_pem) as cert, pem_path(key_pem) as key:
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise PemError("key", "does not match the certificate") from None
            raise PemError("key", "not a PEM private key (or one with a passphrase)") from None


def check_pair(cert_pem: bytes, key_pem: bytes) -> tuple[str, ...]:
    """Validate a certificate and its key as loaded; their DNS names, or PemError."""
    names = certificate_names(cert_pem)
    _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_pem, key_pem)
    return names


def check_ca(ca_pem: bytes) -> None:
    try:
        ssl.create_default_context().load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise PemError("ca", "not PEM CA certificates") from None


def _server_context(cert_pem: bytes, key_pem: bytes, config: ListenerTlsConfig
                    ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[config.min_version]
    # No renegotiation (as nginx and HAProxy): with it a write could need a read first.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if config.alpn:
        context.set_alpn_protocols(list(config.alpn))
    _load_pair(context, cert_pem, key_pem)
    return context


class ServerCertificates:
    """The contexts of one TLS listener; a reload builds a new one (open connections keep
    theirs), so renewed files serve every new connection."""

    def __init__(self, config: ListenerTlsConfig) -> None:
        self.config = config
        contexts = [_server_context(c.cert_pem, c.key_pem, config) for c in config.certificates]
        self.default = contexts[0]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for cert, context in zip(config.certificates, contexts, strict=True):
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)
        # The name each handshake asked for, for the access log (the server side of an
        # SSLObject does not keep it).
        self.asked: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        for context in contexts:
            context.sni_callback = self._pick

    def context_for(self, name: str | None) -> ssl.SSLContext:
        """Exact name first, then a wildcard covering its leftmost label, else the default."""
        if not name:
            return self.default
        name = name.lower().removesuffix(".")
        found = self.exact.get(name)
        if found is None:
            _, _, parent = name.partition(".")
            found = self.wildcard.get(parent, self.default)
        return found

    def _pick(self, sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name:
            self.asked[sslobj] = name.lower()
        context = self.context_for(name)
        if context is not sslobj.context:
            sslobj.context = context


class UpstreamTls:
    """How to speak TLS to one server: the upstream's context and the name to send/verify."""

    __slots__ = ("context", "server_hostname")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.context = context
        self.server_hostname = server_hostname


def client_context(config: UpstreamTlsConfig) -> ssl.SSLContext:
    """The context for connecting to an upstream's servers over TLS."""
    context = ssl.create_default_context(
        cadata=config.ca_pem.decode("ascii") if config.ca_pem else None)
    if config.ca_pem is None:
        context.load_default_certs()
    context.options |= ssl.OP_NO_RENEGOTIATION  # see _server_context
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.cert_pem is not None and config.key_pem is not None:
        _load_pair(context, config.cert_pem, config.key_pem)
    return context
