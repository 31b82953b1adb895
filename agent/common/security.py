"""Who may change QoS through which listener.

The unix socket is guarded by its file mode and group: whoever can connect may do
everything (`AllowAll`). On TCP the read-only services are open; QoS mutations need
mTLS and a client identity on the configured allow list (`AllowedClients`), and are
refused outright without mTLS (`ReadOnly`). There is deliberately no way to allow
mutations over TCP without verified client certificates.

The TCP listener's certificates are checked here too (the stdlib `ssl` module parses
them, so a broken file is a config error at startup rather than a failed handshake
later) and swapped on reload by `ServerCertificates`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.common.errors import FabricError

log = logging.getLogger(__name__)


class AuthContext(Protocol):
    """The part of a servicer context (sync or asyncio) that says who is calling."""

    def auth_context(self) -> Mapping[str, object]: ...


# A refused call: the status code and the message that says how to get in.
Refusal = tuple[grpc.StatusCode, str]


class Authorizer(Protocol):
    """Decides whether the caller of a mutation (the agent's ApplyPolicy, RenewLease and
    DeletePolicy; the aggregator's ApplyPolicy and DeletePolicy) may make it."""

    def refusal(self, context: AuthContext) -> Refusal | None:
        """None when the caller may; else PERMISSION_DENIED or UNAUTHENTICATED and why."""
        ...


def authorize_mutation(authorizer: Authorizer, context: grpc.ServicerContext) -> None:
    """Abort a synchronous RPC that `authorizer` refuses; return when it may go on."""
    refused = authorizer.refusal(context)
    if refused is not None:
        context.abort(*refused)


class AllowAll:
    """A unix socket: access is the socket file's mode and group."""

    def refusal(self, context: AuthContext) -> Refusal | None:
        return None


def _needs_mtls(alternative: str) -> str:
    """Why a mutation over TCP was refused, for every refusal: the client sees how to
    get in."""
    return (
        "mutations over TCP need mTLS with an allowed client identity "
        "(grpc_tls_cert, grpc_tls_key, grpc_client_ca, grpc_allowed_identities) "
        f"or {alternative}"
    )


AGENT_SOCKET = "the agent's unix socket"


class ReadOnly:
    """TCP without client certificates: anyone who can connect may read, nobody may
    change anything. `alternative` names the way in that does not need mTLS."""

    def __init__(self, alternative: str = AGENT_SOCKET) -> None:
        self.alternative = alternative

    def refusal(self, context: AuthContext) -> Refusal | None:
        message = f"{_needs_mtls(self.alternative)}; this listener has no mTLS"
        return grpc.StatusCode.PERMISSION_DENIED, message


class AllowedClients:
    """TCP with mTLS: the TLS handshake has verified the client certificate against
    grpc_client_ca; mutations are for certificates naming an allowed identity."""

    def __init__(self, identities: Iterable[str], alternative: str = AGENT_SOCKET) -> None:
        self.identities = frozenset(identities)
        self.alternative = alternative

    def refusal(self, context: AuthContext) -> Refusal | None:
        try:
            names = client_identities(context)
        except IdentityError as exc:
            return grpc.StatusCode.PERMISSION_DENIED, f"{_needs_mtls(self.alternative)}; {exc}"
        if not names:
            message = f"{_needs_mtls(self.alternative)}; no client certificate identity"
            return grpc.StatusCode.UNAUTHENTICATED, message
        if self.identities.isdisjoint(names):
            message = (
                f"{_needs_mtls(self.alternative)}; client {names[0]!r} is not in "
                "grpc_allowed_identities"
            )
            return grpc.StatusCode.PERMISSION_DENIED, message
        return None


class IdentityError(FabricError):
    """A verified client certificate whose names cannot be an identity (a NUL or another
    non-printable character in one, several subject CNs): the caller gets no identity."""


def client_identities(context: AuthContext) -> tuple[str, ...]:
    """The identities of the verified client certificate: its DNS and URI SANs when it
    has any, its subject CN only when it has none. Empty when the call did not come over
    TLS with a client certificate; IdentityError when the certificate's names cannot be
    trusted as one (see `certificate_identities`)."""
    # The stubs say Mapping[str, bytes]; grpc returns a list of values per key.
    auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    if list(auth.get("transport_security_type", ())) != [b"ssl"]:
        return ()
    pems = list(auth.get("x509_pem_cert", ()))
    if not pems:
        return ()
    return certificate_identities(pems[0])


def certificate_identities(pem: bytes) -> tuple[str, ...]:
    """A certificate's identities, by one rule for every listener: the DNS and URI
    subject alternative names when there is at least one, else the subject's single CN.

    The names are read from the certificate itself, not from gRPC's peer properties:
    gRPC copies the CN as a C string, so `rt-operator\\0evil` would arrive as
    `rt-operator`. A name that is empty or holds a character that is not printable
    (NUL, control characters, other non-printables) makes the whole certificate
    unusable as an identity (IdentityError): a CA that signed it was tricked or careless,
    and no part of it is trusted. IP and e-mail SANs are never identities: an identity
    is a name a CA vouches for, not an address.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(f"client certificate does not parse: {exc}") from exc
    try:
        alternatives = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names: list[str] = []
    else:
        san = alternatives.value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += san.get_values_for_type(x509.UniformResourceIdentifier)
    source = "subject alternative name"
    if not names:
        source = "subject CN"
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(common) > 1:
            raise IdentityError(f"client certificate has {len(common)} subject CNs")
        names = [str(attribute.value) for attribute in common]
    unique: list[str] = []
    for name in names:
        if not name or not name.isprintable():
            raise IdentityError(
                f"client certificate {source} {name!r} is empty or holds a non-printable "
                "character: not an identity"
            )
        if name not in unique:
            unique.append(name)
    return tuple(unique)


# --- server certificates: loaded, checked and reloaded ---


class TlsError(FabricError):
    """A TLS file that cannot be used; `option` is the config option that names it."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


@dataclass(frozen=True)
class TlsFiles:
    """Where the TCP listener's certificate, key and (for mTLS) client CA live."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM contents of a `TlsFiles`, checked: the certificate parses, the key is its
    key, the client CA bundle holds at least one certificate."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert_chain)], self.client_ca
        )


def read_certificates(path: Path, option: str) -> bytes:
    """A PEM file of one or more certificates; TlsError naming `option` when it is not."""
    data = _read(path, option)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise TlsError(option, f"{path}: not a PEM certificate file ({exc})") from exc
    return data


def read_key_for(cert: Path, key: Path, option: str = "grpc_tls_key") -> bytes:
    """The private key in `key`, checked to belong to the first certificate in `cert`."""
    data = _read(key, option)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from prompting on a terminal for an
        # encrypted key; the empty password then fails like any other bad key.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            option,
            f"{key}: not an unencrypted PEM private key for the certificate in {cert} ({exc})",
        ) from exc
    return data


def load_tls(files: TlsFiles) -> TlsMaterial:
    """Read and check the files; TlsError naming the first unusable one."""
    cert_chain = read_certificates(files.cert, "grpc_tls_cert")
    key = read_key_for(files.cert, files.key)
    client_ca = None
    if files.client_ca is not None:
        client_ca = read_certificates(files.client_ca, "grpc_client_ca")
    # The key check opens the files by path: a rotation between the reads could pair a
    # new certificate with an old key. Read again and insist nothing moved.
    if _read(files.cert, "grpc_tls_cert") != cert_chain or _read(files.key, "grpc_tls_key") != key:
        raise TlsError("grpc_tls_cert", f"{files.cert} or {files.key} changed while being read")
    return TlsMaterial(cert_chain, key, client_ca)


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(option, f"cannot read {path}: {exc.strerror or exc}") from exc


class ServerCertificates:
    """The TCP listener's certificates, swapped on `reload()` (SIGHUP) without a restart.

    gRPC asks `fetch` for a new configuration at each TLS handshake; it answers None
    (keep the current one) except once after a reload loaded new, valid files, so new
    connections get the new certificate and open ones keep theirs.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._current = load_tls(files)
        self._pending: TlsMaterial | None = None
        self._lock = threading.Lock()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that use these certificates; client certificates are
        required (and verified against the client CA) when a client CA is set."""
        # The stubs' fetcher type leaves out None, which is gRPC's "unchanged".
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._current.configuration(),
            fetcher,
            require_client_authentication=self.files.client_ca is not None,
        )

    def reload(self) -> bool:
        """Load the files again; True when they changed and new handshakes will use them.
        Unusable files are logged and the certificates in use are kept."""
        try:
            loaded = load_tls(self.files)
        except TlsError as exc:
            log.error("TLS reload failed, keeping the certificates in use: %s", exc)
            return False
        with self._lock:
            if loaded == self._current:
                log.info("TLS reload: %s and %s unchanged", self.files.cert, self.files.key)
                return False
            self._pending = self._current = loaded
        log.info("TLS reload: new connections use the certificate in %s", self.files.cert)
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending is None else pending.configuration()
