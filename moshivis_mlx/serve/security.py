"""Who may talk to the server: loopback by default; any other address only over TLS and
with the access token the printed URL carries.

A browser gives a page the microphone only in a secure context (https, or localhost), so a
phone on the network needs TLS anyway. Without a certificate of the user's
(--ssl-cert/--ssl-key) a self-signed one is made on first use and kept in the cache; its
SHA-256 fingerprint is printed so the user can check what the phone shows before accepting
it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..fileio import atomic_write

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
CERT_DAYS = 825
"""Apple's limit for a TLS server certificate's validity."""


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


@dataclass(frozen=True)
class Security:
    """What the server requires: TLS (a context) and a token (None: no token)."""

    ssl_context: ssl.SSLContext | None
    token: str | None
    fingerprint: str | None = None
    """The certificate's SHA-256, colon-separated, to compare with what a browser shows."""
    cert: Path | None = None

    def allows(self, offered: str | None) -> bool:
        """Whether a request's token (query, cookie or bearer header) is the server's."""
        if self.token is None:
            return True
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def security_for(host: str, cert: Path | None, key: Path | None, no_tls: bool,
                 token: str | None, cache: Path) -> Security:
    """The policy for a bind address: loopback needs nothing (TLS if a certificate is
    given); anything else needs TLS (the user's certificate, or a self-signed one made in
    `cache`) and a token (`token`, or a random one)."""
    if (cert is None) != (key is None):
        raise UsageError("--ssl-cert and --ssl-key go together", "give both, or neither")
    loopback = is_loopback(host)
    if not loopback and no_tls:
        raise UsageError(f"--host {host} is reachable from the network: it needs TLS, and "
                         f"--no-tls turns TLS off",
                         "leave out --no-tls (a self-signed certificate is made), or serve "
                         "on 127.0.0.1")
    if no_tls and cert is not None:
        raise UsageError("--no-tls contradicts --ssl-cert/--ssl-key", "choose one")
    if loopback and cert is None:
        return Security(None, token)
    if cert is None:
        cert, key = self_signed(cache, host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot use the certificate {cert} with the key {key}: "
                         f"{getattr(e, 'strerror', None) or e}",
                         "give a PEM certificate and its private key") from None
    return Security(context, token if token is not None or loopback
                    else secrets.token_urlsafe(18), fingerprint(cert), cert)


def fingerprint(cert: Path) -> str:
    """The certificate's SHA-256 as browsers show it (AB:CD:...)."""
    der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def self_signed(cache: Path, host: str) -> tuple[Path, Path]:
    """The cached self-signed certificate and key (made on first use, for this machine's
    names and addresses; made again when expired or when `host` is not among them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = cache / CERT_NAME, cache / KEY_NAME
    names = _names(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert_path.exists() and key_path.exists():
        try:
            old = x509.load_pem_x509_certificate(cert_path.read_bytes())
            alt = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = {str(v) for v in alt.get_values_for_type(x509.DNSName)} | {
                str(v) for v in alt.get_values_for_type(x509.IPAddress)}
            if old.not_valid_after_utc > now + datetime.timedelta(days=1) and \
                    {str(n) for n in names} <= covered:
                return cert_path, key_path
        except (ValueError, x509.ExtensionNotFound):
            pass  # damaged: made again
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moshivis-mlx on "
                                            + socket.gethostname()[:40])])
    alt_names = [x509.IPAddress(n) if not isinstance(n, str) else x509.DNSName(n)
                 for n in names]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o700)  # the private key's directory: the user's only
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _names(host: str) -> list:
    """The names and addresses the certificate covers: localhost, this machine's name, its
    addresses on the network, and `host`."""
    names: list = ["localhost", ipaddress.ip_address("127.0.0.1")]
    hostname = socket.gethostname()
    if hostname:
        names.append(hostname)
    for address in local_addresses():
        names.append(ipaddress.ip_address(address))
    try:
        names.append(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        names.append(host)
    unique: list = []
    for n in names:
        if n not in unique and not (isinstance(n, ipaddress.IPv4Address)
                                    and n == ipaddress.ip_address("0.0.0.0")):
            unique.append(n)
    return unique


def local_addresses() -> list[str]:
    """This machine's address on the network (the one a phone on the same network
    reaches), found without sending anything."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # a documentation address: nothing is sent
            found.append(s.getsockname()[0])
        except OSError:
            pass
    return [a for a in found if not ipaddress.ip_address(a).is_loopback]
