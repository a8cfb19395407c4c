"""The local stack's own certificate authority: a CA made once per data dir, and a server
certificate for each address the stack listens on (``farm up --listen``).

Clients on other machines trust the CA file (``DATA/tls/ca.pem``) and nothing else; its key
never leaves the data dir (mode 0600), so only this stack can issue certificates under it.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import AuthorityKeyIdentifier as AKI
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from farm.local.procs import write_private

VALID_FOR = datetime.timedelta(days=825)  # the longest lifetime clients accept for a server
CA_NAME = "farm local stack CA"  # + a random tag: two stacks' CAs never share a name


def ca_path(tls_dir: Path) -> Path:
    return tls_dir / "ca.pem"


def server_pair(tls_dir: Path, address: str) -> tuple[Path, Path]:
    """(certificate, key) for ``address``, issued by the data dir's CA; made when missing."""
    cert_path, key_path = tls_dir / f"server-{address}.pem", tls_dir / f"server-{address}.key"
    if not cert_path.exists():
        ca_cert, ca_key = _authority(tls_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        names = [_san(address), x509.DNSName("localhost")]
        cert = (
            builder(_name(address), ca_cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(AKI.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    return cert_path, key_path


def _authority(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = ca_path(tls_dir), tls_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key  # type: ignore[return-value]
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{CA_NAME} {secrets.token_hex(4)}")
    cert = (
        builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(signs_certificates=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    return cert, key


def builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    """What every certificate here has (``key``: its private half; the message-signing tests
    sign theirs with it too). Python 3.13's default context checks strictly (RFC
    5280: key identifiers, key usage), so a client there must accept these too."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of other hosts lag
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
