"""Throwaway TLS for tests: a private CA, server certificates it signs, and the Twisted
pieces to listen with them and to trust them.

Tests must show that a client refuses a certificate for another name and accepts the
right one under a custom trust root, without the network or the machine's trust store:
so each test run makes its own CA (EC P-256 keys, quick to generate), and nothing here is
ever trusted outside the test that made it. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.web.client import BrowserLikePolicyForHTTPS

LOOPBACK = "127.0.0.1"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    """Valid from a day ago (a little clock skew must not matter) for ``days`` days."""
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(
        now + datetime.timedelta(days=days))


@dataclass(frozen=True)
class CertificateFiles:
    """Where ``ServerCertificate.write`` put the PEM files."""

    certificate: Path
    key: Path
    ca: Path

    def endpoint_description(self, port: int = 0, interface: str = LOOPBACK) -> str:
        """A ``serverFromString`` description listening with TLS on these files."""
        return (f"ssl:{port}:interface={_escape(interface)}"
                f":privateKey={_escape(str(self.key))}:certKey={_escape(str(self.certificate))}")


def _escape(value: str) -> str:
    """Endpoint descriptions split on ``:`` and ``=``; a backslash escapes them."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@dataclass(frozen=True)
class ServerCertificate:
    """A server certificate and its key, with the PEM of the CA that signed it."""

    certificate_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]

    def write(self, directory: Path) -> CertificateFiles:
        """Write ``server.pem``, ``server.key`` and ``ca.pem`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        files = CertificateFiles(directory / "server.pem", directory / "server.key",
                                 directory / "ca.pem")
        files.certificate.write_bytes(self.certificate_pem)
        files.key.write_bytes(self.key_pem)
        files.key.chmod(0o600)
        files.ca.write_bytes(self.ca_pem)
        return files

    def context_factory(self) -> CertificateOptions:
        """Twisted's server-side TLS options for this certificate."""
        private = PrivateCertificate.loadPEM(self.key_pem + self.certificate_pem)
        options: CertificateOptions = private.options()
        return options

    def endpoint(self, reactor: Any, port: int = 0) -> SSL4ServerEndpoint:
        """A TLS server endpoint on 127.0.0.1 (``port`` 0: any free port)."""
        return SSL4ServerEndpoint(reactor, port, self.context_factory(), interface=LOOPBACK)


@dataclass(frozen=True)
class Authority:
    """A throwaway certificate authority."""

    certificate_pem: bytes
    key_pem: bytes

    def issue(self, dns_names: Sequence[str] = ("localhost",),
              ip_addresses: Sequence[str] = (), days: int = 2) -> ServerCertificate:
        """A server certificate for these names (subjectAltName only, as browsers and
        service_identity read it; the common name is the first name, for people)."""
        if not dns_names and not ip_addresses:
            raise ValueError("a server certificate needs a DNS name or an IP address")
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        key = _new_key()
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name([*dns_names, *ip_addresses][0]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        certificate = _validity(builder, days).sign(ca_key, hashes.SHA256())
        return ServerCertificate(certificate.public_bytes(serialization.Encoding.PEM),
                                 _key_pem(key), self.certificate_pem, tuple(dns_names),
                                 tuple(ip_addresses))

    def trust_root(self) -> Certificate:
        """This CA as a Twisted trust root (a ``Certificate`` provides IOpenSSLTrustRoot)."""
        return Certificate.loadPEM(self.certificate_pem)

    def client_policy(self) -> BrowserLikePolicyForHTTPS:
        """An HTTPS policy for ``Agent`` that trusts this CA and nothing else, and checks
        the host name as a browser does."""
        return BrowserLikePolicyForHTTPS(trustRoot=self.trust_root())


def make_authority(common_name: str = "dpvoip throwaway test CA", days: int = 2) -> Authority:
    """A new self-signed CA, valid for ``days`` days."""
    key = _new_key()
    name = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    certificate = _validity(builder, days).sign(key, hashes.SHA256())
    return Authority(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))
