"""TLS for the web consoles (Flower, `farm ui`, `farm metrics` and each worker's /metrics),
decided here once for all of them: FARM_CONSOLE_TLS_CERT and FARM_CONSOLE_TLS_KEY, both or
neither. The pair is loaded when a console starts, so a wrong path or pair is one line then,
not a failed handshake for every visitor later."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from farm.config import Settings
from farm.errors import ConfigError

CERT, KEY = "FARM_CONSOLE_TLS_CERT", "FARM_CONSOLE_TLS_KEY"


@dataclass(frozen=True)
class ConsoleTLS:
    """A certificate and key that load together. Flower and uvicorn take the paths (they
    build their own context from them); the metrics servers take ``context``."""

    cert: Path
    key: Path
    context: ssl.SSLContext


def console_tls(settings: Settings) -> ConsoleTLS | None:
    """The consoles' TLS, or None for plain HTTP (neither setting). ConfigError, one line,
    when only one is set, or a file cannot be read, or the two are not a certificate and its
    private key."""
    cert, key = settings.console_tls_cert, settings.console_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"{CERT} and {KEY} go together: set both for HTTPS, or neither.")
    for name, path in ((CERT, cert), (KEY, key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}.") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A key with a passphrase would make OpenSSL ask for it on the terminal: answer "".
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(_pair_problem(cert, key, exc)) from None
    return ConsoleTLS(cert, key, context)


def scheme(tls: ConsoleTLS | None) -> str:
    """What a console's URL starts with."""
    return "https" if tls else "http"


def _pair_problem(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Which of the two is wrong: OpenSSL says "PEM lib" for a bad certificate and a bad key
    alike, so the certificate is tried on its own first."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{KEY}: {key} is not the private key of {CERT} ({cert})."
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert.read_text())
    except (ssl.SSLError, ValueError):  # ValueError: not text at all
        return f"{CERT}: {cert} holds no PEM certificate."
    return f"{KEY}: {key} is not a PEM private key (without a passphrase)."
