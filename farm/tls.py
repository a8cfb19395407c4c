"""TLS from the client side: how a certificate that failed verification shows at each
boundary (redis-py, psycopg2, botocore, kombu wrap it each their own way), and the one error
it becomes there.

Without this a wrong CA looks like an unreachable server: clients would wait out
FARM_OUTAGE_TIMEOUT and workers would retry forever, for a fault no waiting can mend.
"""

from __future__ import annotations

import ssl

from farm.errors import TlsUntrusted

# What OpenSSL, libpq and redis-py say, for libraries that keep only the message.
_VERIFY_WORDS = (
    "certificate verify failed",
    "does not match host name",
    "hostname mismatch",
    "ip address mismatch",
    "provider signature failure",  # libpq, given a CA of the same name as the real one
)


def verify_failed(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a failed certificate check."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if any(word in str(current).lower() for word in _VERIFY_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def untrusted(service: str, where: str, setting: str) -> TlsUntrusted:
    return TlsUntrusted(
        f"{service} at {where} presented a certificate that failed verification (not signed "
        f"by the CA this client trusts, or issued for another host name); check {setting}"
    )
