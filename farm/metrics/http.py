"""Serving metrics over HTTP behind the same basic auth as Flower (FARM_FLOWER_USER and
FARM_FLOWER_PASSWORD), on loopback unless FARM_METRICS_ADDRESS says otherwise, and over HTTPS
only when the consoles' TLS is set (farm.consoles)."""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from farm.config import Settings
from farm.consoles import ConsoleTLS, console_tls, scheme
from farm.errors import ConfigError

log = logging.getLogger(__name__)
WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes come every few seconds: no line for each on the worker's stderr."""


class MetricsServer(ThreadingWSGIServer):
    """prometheus-client's threading server, speaking TLS only when given the consoles'."""

    tls: ConsoleTLS | None = None

    @property
    def scheme(self) -> str:
        return scheme(self.tls)

    @property
    def address(self) -> str:
        """host:port, as a Prometheus target names it."""
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}/metrics"

    def finish_request(self, request, client_address) -> None:
        if self.tls is None:
            return super().finish_request(request, client_address)
        # The handshake runs here, in the connection's own thread, not on the listening socket
        # in accept() as prometheus-client's does: a client that connects and says nothing, or
        # speaks plain HTTP, holds up itself only, and is dropped without a traceback.
        try:
            connection = self.tls.context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError included
            log.debug("metrics: no TLS handshake with %s: %s", client_address, exc)
            return None
        with connection:
            return super().finish_request(connection, client_address)


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


def serve(
    registry: CollectorRegistry, settings: Settings, port: int, tries: int = 1
) -> MetricsServer:
    """Serve ``registry`` on ``settings.metrics_address`` at ``port``, or the next free one of
    ``tries`` ports, from a daemon thread. ConfigError when no password is set or no port
    is free, or the consoles' TLS settings are wrong."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"a metrics port must be 0 to 65535, not {port}")
    password = password_of(settings)
    if not password:
        raise ConfigError("metrics need FARM_FLOWER_PASSWORD (the basic auth Flower uses)")
    tls = console_tls(settings)
    app = require_auth(make_wsgi_app(registry), settings.flower_user, password)
    server = _bind(app, settings.metrics_address, port, tries)
    server.tls = tls
    threading.Thread(target=server.serve_forever, name="farm-metrics", daemon=True).start()
    return server


def _bind(app: WsgiApp, address: str, port: int, tries: int) -> MetricsServer:
    for candidate in range(port, min(port + tries, 65536)):
        try:
            return make_server(address, candidate, app, MetricsServer, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(f"metrics cannot listen on {address}:{candidate}: {exc}") from exc
    last = min(port + tries, 65536) - 1
    span = f"{port}" if last == port else f"{port}-{last}"
    raise ConfigError(f"metrics cannot listen on {address}:{span}: in use")
