"""A throwaway certificate authority and a server certificate for 127.0.0.1 for the consoles'
TLS tests (clients verify against ``ca``, as a user's would)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
