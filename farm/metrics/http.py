"""Serving metrics over HTTP behind the same basic auth as Flower (FARM_FLOWER_USER and
FARM_FLOWER_PASSWORD), on loopback unless FARM_METRICS_ADDRESS says otherwise."""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from farm.config import Settings
from farm.errors import ConfigError

log = logging.getLogger(__name__)
WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes come every few seconds: no line for each on the worker's stderr."""


def require_auth(app: WsgiApp, user: str, password: str) -> WsgiApp:
    """``app`` answering only requests with these basic-auth credentials; 401 otherwise."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    expected = f"Basic {token}".encode()

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        headers = [("WWW-Authenticate", 'Basic realm="farm"'), ("Content-Type", "text/plain")]
        start_response("401 Unauthorized", headers)
        return [b"401: this endpoint needs the farm's basic-auth credentials\n"]

    return guarded


def password_of(settings: Settings) -> str | None:
    password = settings.flower_password
    return password.get_secret_value() if password else None


def serve(registry: CollectorRegistry, settings: Settings, port: int, tries: int = 1) -> WSGIServer:
    """Serve ``registry`` on ``settings.metrics_address`` at ``port``, or the next free one of
    ``tries`` ports, from a daemon thread. ConfigError when no password is set or no port
    is free."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"a metrics port must be 0 to 65535, not {port}")
    password = password_of(settings)
    if not password:
        raise ConfigError("metrics need FARM_FLOWER_PASSWORD (the basic auth Flower uses)")
    app = require_auth(make_wsgi_app(registry), settings.flower_user, password)
    server = _bind(app, settings.metrics_address, port, tries)
    threading.Thread(target=server.serve_forever, name="farm-metrics", daemon=True).start()
    return server


def _bind(app: WsgiApp, address: str, port: int, tries: int) -> WSGIServer:
    for candidate in range(port, min(port + tries, 65536)):
        try:
            return make_server(address, candidate, app, ThreadingWSGIServer, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(f"metrics cannot listen on {address}:{candidate}: {exc}") from exc
    last = min(port + tries, 65536) - 1
    span = f"{port}" if last == port else f"{port}-{last}"
    raise ConfigError(f"metrics cannot listen on {address}:{span}: in use")
