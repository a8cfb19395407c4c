"""TLS in front of the local stack's servers, for ``farm up --listen ADDRESS``.

The Redis and Postgres the wheels ship are built without TLS, so the stack keeps them (and
S3) on 127.0.0.1 and this process listens on ADDRESS, on the same port numbers, terminating
TLS and relaying each connection to the server behind it. Redis and S3 speak TLS from the
first byte; Postgres asks for it in its own protocol (an SSLRequest, answered ``S``), which is
what ``sslmode=verify-full`` clients send. A client that does not ask for TLS is dropped:
nothing leaves this host in the clear.

Run as ``python -m farm.local.tls_front CONFIG.json DATA_DIR`` (the stack starts it, as
``TlsFront``); the config names the address, the certificate pair and ``{"kind":
"tls"|"postgres", "port": N}`` per server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
import sys
from pathlib import Path

from farm.local import certs
from farm.local.procs import Json, running_with, spawn, write_private
from farm.local.server import Server

log = logging.getLogger("farm.tls_front")

BACKEND = "127.0.0.1"
SSL_REQUEST = 80877103  # the Postgres protocol's "may we speak TLS?" code
GSSENC_REQUEST = 80877104  # "may we speak GSSAPI encryption?": answered no, the client goes on
CHUNK = 64 * 1024


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until it ends, then pass the end on where the transport can."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, ssl.SSLError, OSError):
        writer.close()


async def pipe(client_r, client_w, port: int) -> None:
    """Join an accepted (already TLS) client to the server on ``port`` behind us. A client
    that is done sending gets its answer still (the server sees an end of input); once the
    server is done, or gone, so is the connection: Redis and Postgres close on their side,
    and a client must not wait on a relay to a server that left."""
    try:
        server_r, server_w = await asyncio.open_connection(BACKEND, port)
    except OSError as exc:
        log.warning("port %d: the server behind is down (%s)", port, exc)
        client_w.close()
        return
    upstream = asyncio.create_task(relay(client_r, server_w))
    try:
        await relay(server_r, client_w)
    finally:
        upstream.cancel()
        for writer in (client_w, server_w):
            writer.close()


async def negotiate_postgres(reader, writer, context: ssl.SSLContext) -> bool:
    """Answer the client's SSLRequest and upgrade the connection; False: drop it."""
    while True:
        header = await reader.readexactly(8)
        length, code = struct.unpack("!ii", header)
        if length == 8 and code == GSSENC_REQUEST:
            writer.write(b"N")
            await writer.drain()
            continue
        if length != 8 or code != SSL_REQUEST:
            return False  # a plain-text startup: refused, the password never crosses
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(context)
        return True


def handler(kind: str, port: int, context: ssl.SSLContext):
    async def handle(reader, writer) -> None:
        try:
            if kind == "postgres" and not await negotiate_postgres(reader, writer, context):
                writer.close()
                return
            await pipe(reader, writer, port)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("port %d: connection dropped (%s)", port, exc)
            writer.close()

    return handle


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def serve(config: dict) -> None:
    context = server_context(config["cert"], config["key"])
    servers = []
    for entry in config["servers"]:
        kind, port = entry["kind"], entry["port"]
        # Postgres starts in the clear and upgrades; the others are TLS from the first byte
        tls = None if kind == "postgres" else context
        servers.append(
            await asyncio.start_server(
                handler(kind, port, context), config["address"], port, ssl=tls
            )
        )
    log.info("TLS on %s, ports %s", config["address"], [e["port"] for e in config["servers"]])
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = json.loads(Path(sys.argv[1]).read_text())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))


class TlsFront(Server):
    """The front as one more server of the local stack (``stack.json``: ``tls``)."""

    name = "tls"
    process_name = "python"

    def __init__(self, data_dir: Path, st: Json, backends: dict[str, int]) -> None:
        super().__init__(data_dir, st)
        self.backends = backends  # server name -> the port it and this front share

    @property
    def address(self) -> str:
        return str(self.st["address"])

    def ca(self) -> Path:
        return certs.ca_path(self.directory())

    def ports(self) -> list[int]:
        return []  # it binds the backends' port numbers on another address

    def main_port(self) -> int:
        return self.backends["redis"]

    def alive(self) -> bool:
        return running_with(self.pid(), __name__, str(self.data_dir))

    def launch(self) -> int:
        directory = self.directory()
        cert, key = certs.server_pair(directory, self.address)
        servers = [
            {"kind": "postgres" if name == "postgres" else "tls", "port": port}
            for name, port in self.backends.items()
        ]
        config = {"address": self.address, "cert": str(cert), "key": str(key), "servers": servers}
        path = directory / "front.json"
        write_private(path, json.dumps(config))
        args = [sys.executable, "-m", __name__, str(path), str(self.data_dir)]
        return spawn(args, directory, self.log_path())

    def probe(self) -> bool:
        """A TLS handshake on every port, verified against the CA as a client would."""
        context = ssl.create_default_context(cafile=str(self.ca()))
        try:
            for port in self.backends.values():
                with socket.create_connection((self.address, port), timeout=1) as sock:
                    if port == self.backends["postgres"]:
                        sock.sendall(struct.pack("!ii", 8, SSL_REQUEST))
                        if sock.recv(1) != b"S":
                            return False
                    context.wrap_socket(sock, server_hostname=self.address).close()
        except (OSError, ssl.SSLError):
            return False
        return True


if __name__ == "__main__":
    main()
