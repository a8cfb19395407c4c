"""`farm ui`: the web console, on loopback by default, with the same basic auth as Flower."""

from __future__ import annotations

import socket

import typer

from farm.cli.app import app, err
from farm.cli.stack import with_password
from farm.config import Settings
from farm.consoles import console_tls, scheme
from farm.errors import ConfigError


@app.command()
def ui(
    address: str | None = typer.Option(
        None, "--address", help="Where to listen (FARM_UI_ADDRESS, 127.0.0.1): keep it private."
    ),
    port: int | None = typer.Option(None, "--port", help="FARM_UI_PORT (8686)."),
) -> None:
    """Run the web console: batches, jobs (timeline, output, resume, cancel) and workers, with
    basic auth from FARM_FLOWER_USER/PASSWORD (a password is made up when none is set)."""
    import uvicorn

    from farm.api import Farm
    from farm.ui import create_app

    settings = with_password(Settings.from_env())
    address, port = address or settings.ui_address, port if port is not None else settings.ui_port
    password = settings.flower_password.get_secret_value()
    tls = console_tls(settings)
    listener = _listen(address, port)  # before anything else: a taken port is a one-line error
    console = create_app(Farm(settings), user=settings.flower_user, password=password)
    host, bound = listener.getsockname()[:2]
    url = f"{scheme(tls)}://{_url_host(host)}:{bound}"
    err.print(f"farm ui on {url} (user {settings.flower_user})")
    files = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls else {}
    config = uvicorn.Config(console, log_level="warning", lifespan="off", **files)
    uvicorn.Server(config).run(sockets=[listener])


def _listen(address: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535, not {port}")
    try:
        info = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(info[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(info[4])
        listener.listen(128)
    except OSError as exc:
        raise ConfigError(
            f"farm ui cannot listen on {address}:{port}: {exc.strerror or exc}"
        ) from None
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
