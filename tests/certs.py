"""A throwaway certificate authority and a server certificate for 127.0.0.1 for the consoles'
TLS tests (clients verify against ``ca``, as a user's would), and the certificate builder the
message-signing tests use."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from farm.local import certs as local_certs


@dataclass(frozen=True)
class Certs:
    ca: Path  # the authority's certificate: what a client trusts
    cert: Path  # the server's, for 127.0.0.1 and localhost, signed by the authority
    key: Path  # the server's private key

    def env(self) -> dict[str, str]:
        """The settings that turn the consoles' TLS on with this pair."""
        return {"FARM_CONSOLE_TLS_CERT": str(self.cert), "FARM_CONSOLE_TLS_KEY": str(self.key)}


def make_certs(folder: Path) -> Certs:
    """A new authority and a server certificate it signed for 127.0.0.1 and localhost, as PEM
    files in ``folder``: the local stack's own (farm.local.certs), as `farm up --listen`
    makes them."""
    cert, key = local_certs.server_pair(folder, "127.0.0.1")
    return Certs(local_certs.ca_path(folder), cert, key)


def builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    """A certificate of ``key``'s public half, valid from a few minutes ago for a day: what is
    left is its extensions and the issuer's signature."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
