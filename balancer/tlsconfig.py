"""The TLS parts of the configuration: listeners' `tls` and `sni`, upstreams' `tls`.

Part of config.py (which re-exports the dataclasses), kept apart to keep each module small.
Certificate, key and CA files are read and checked here, at every (re)load: a file that cannot
be read, is not PEM, or a key that does not match its certificate is a config error naming the
file's key path, so a bad renewal is refused while the old certificates keep serving. Relative
paths are taken from the config file's directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ._validate import Section, as_list, as_mapping, describe, item
from .tls import VERSIONS, PemError, check_ca, check_pair

LISTENER_TLS_KEYS = ("certificates", "min_version", "alpn", "handshake_timeout")
CERTIFICATE_KEYS = ("cert", "key")
UPSTREAM_TLS_KEYS = ("ca", "verify", "sni", "cert", "key")
MAX_PEM = 1 << 20  # no certificate file is a megabyte

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_SNI_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class CertificateConfig:
    """A certificate chain and its key, as read at load time (`names` from its SANs)."""

    cert: str
    key: str
    cert_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]


@dataclass(frozen=True)
class ListenerTlsConfig:
    """TLS termination at a listener."""

    certificates: tuple[CertificateConfig, ...]
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ()
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class UpstreamTlsConfig:
    """TLS from the balancer to an upstream's servers."""

    ca: str | None = None
    ca_pem: bytes | None = None
    verify: bool = True
    sni: str | None = None  # server name to send and verify; default: the server's host
    cert: str | None = None
    key: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None


_LISTENER_TLS = ListenerTlsConfig(certificates=())


def _read_pem(section: Section, key: str, base: Path) -> tuple[str, bytes] | None:
    """(path as written, contents) of a required PEM file; None and a problem otherwise."""
    value = section.string(key)
    if value is None:
        if section.get(key) is None:
            section.fail(key, "required")
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PEM + 1)
    except OSError as exc:
        section.fail(key, f"cannot read {str(path)!r}: {exc.strerror or exc}")
        return None
    if len(data) > MAX_PEM:
        section.fail(key, f"{str(path)!r} is larger than {MAX_PEM} bytes")
        return None
    return value, data


def listener_tls(listener: Section, base: Path) -> ListenerTlsConfig | None:
    if listener.get("tls") is None:
        return None
    section = listener.sub("tls", LISTENER_TLS_KEYS)
    certificates = _certificates(section, base)
    version = section.get("min_version")
    min_version = _LISTENER_TLS.min_version
    if version is not None:
        text = str(version) if isinstance(version, str | float) else None
        if text in VERSIONS:
            min_version = text
        else:
            section.fail("min_version", f"must be one of {', '.join(VERSIONS)} (quoted), "
                         f"got {describe(version)}")
    alpn = _alpn(section)
    timeout = section.duration("handshake_timeout", _LISTENER_TLS.handshake_timeout,
                               positive=True)
    if not certificates:
        return None
    return ListenerTlsConfig(certificates, min_version, alpn, timeout)


def _certificates(section: Section, base: Path) -> tuple[CertificateConfig, ...]:
    value = section.required("certificates")
    items = None if value is None else as_list(value, section.at("certificates"),
                                               section.problems)
    if items is None:
        return ()
    if not items:
        section.fail("certificates", "must not be empty")
    found = []
    for index, raw in enumerate(items):
        path = item(section.at("certificates"), index)
        data = as_mapping(raw, path, section.problems)
        if data is None:
            continue
        entry = Section(data, path, section.problems, CERTIFICATE_KEYS)
        cert, key = _read_pem(entry, "cert", base), _read_pem(entry, "key", base)
        if cert is None or key is None:
            continue
        try:
            names = check_pair(cert[1], key[1])
        except PemError as exc:
            entry.fail(exc.field, exc.reason)
            continue
        found.append(CertificateConfig(cert[0], key[0], cert[1], key[1], names))
    return tuple(found)


def _alpn(section: Section) -> tuple[str, ...]:
    value = section.get("alpn")
    if value is None:
        return ()
    items = as_list(value, section.at("alpn"), section.problems)
    protocols = []
    for index, raw in enumerate(items or []):
        if not isinstance(raw, str) or not 0 < len(raw.encode()) < 256:
            section.problems.add(item(section.at("alpn"), index),
                                 f"must be a protocol name like h2, got {describe(raw)}")
        else:
            protocols.append(raw)
    return tuple(protocols)


def listener_sni(listener: Section, known: set[str] | None) -> dict[str, str] | None:
    """`sni: {name: upstream}`: names lower case, `*.` wildcards; upstreams must exist."""
    value = listener.get("sni")
    if value is None:
        return None
    data = as_mapping(value, listener.at("sni"), listener.problems)
    if data is None:
        return None
    if not data:
        listener.fail("sni", "must not be empty")
    rules: dict[str, str] = {}
    for name, upstream in data.items():
        path = f"{listener.at('sni')}.{name}"
        if not isinstance(name, str) or not _SNI_NAME.match(name.lower().removesuffix(".")):
            listener.problems.add(path, "must be a host name or *.domain")
            continue
        if not isinstance(upstream, str):
            listener.problems.add(path, f"must be an upstream name, got {describe(upstream)}")
            continue
        if known and upstream not in known:
            listed = ", ".join(sorted(known))
            listener.problems.add(path, f"unknown upstream {upstream!r} (known: {listed})")
            continue
        rules[name.lower().removesuffix(".")] = upstream
    return rules


def upstream_tls(upstream: Section, base: Path) -> UpstreamTlsConfig | None:
    if upstream.get("tls") is None:
        return None
    section = upstream.sub("tls", UPSTREAM_TLS_KEYS)
    verify = section.boolean("verify", True)
    sni = section.string("sni")
    if sni is not None and not _SNI_NAME.match(sni.lower()):
        section.fail("sni", f"must be a host name, got {sni!r}")
        sni = None
    ca = _read_pem(section, "ca", base) if section.get("ca") is not None else None
    if ca is not None:
        try:
            check_ca(ca[1])
        except PemError as exc:
            section.fail(exc.field, exc.reason)
            ca = None
    cert = key = None
    if section.get("cert") is not None or section.get("key") is not None:
        cert, key = _read_pem(section, "cert", base), _read_pem(section, "key", base)
        if cert is not None and key is not None:
            try:
                check_pair(cert[1], key[1])
            except PemError as exc:
                section.fail(exc.field, exc.reason)
                cert = key = None
    return UpstreamTlsConfig(
        ca=ca[0] if ca else None, ca_pem=ca[1] if ca else None, verify=verify, sni=sni,
        cert=cert[0] if cert else None, key=key[0] if key else None,
        cert_pem=cert[1] if cert else None, key_pem=key[1] if key else None)

