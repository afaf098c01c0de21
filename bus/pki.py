"""A small private PKI for one deployment: a CA and the broker's server certificate, made with ``cryptography``.

``fedbus up`` makes both on first start in ``<data dir>/auth/``: the CA signs the server certificate for the
names and addresses the broker listens on, and every creds file carries the CA certificate, so clients verify
the broker (NATS and MQTT alike) without trusting anything else. Keys are ECDSA P-256: fast handshakes, small.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import write_private

__all__ = ["Pki", "server_names"]

_CA_DAYS = 3650
_SERVER_DAYS = 825


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def server_names(host: str) -> list[str]:
    """The names a server certificate for a broker bound to ``host`` should carry."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if host not in ("", "0.0.0.0", "::"):  # naming the wildcard, not binding it
        names.append(host)
    return list(dict.fromkeys(names))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class Pki:
    """The CA and server certificate files under ``directory``."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def ca_pem(self) -> str:
        return self.ca_cert.read_text()

    def ensure(self, names: list[str]) -> bool:
        """Create the CA (once) and a server certificate covering ``names`` (again when a name is missing).
        Returns whether anything was made."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        made = False
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            self._make_ca()
            made = True
        if made or not self._server_covers(names):
            self._make_server(names)
            made = True
        return made

    def _make_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbus CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbus")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.ca_key, key)
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _make_server(self, names: list[str]) -> None:
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbus broker")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(self.server_key, key)
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _server_covers(self, names: list[str]) -> bool:
        if not (self.server_cert.exists() and self.server_key.exists()):
            return False
        cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        if cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=7):
            return False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        have |= set(san.get_values_for_type(x509.DNSName))
        want = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
        return want <= have


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
