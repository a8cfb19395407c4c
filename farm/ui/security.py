"""Who may use the console: basic auth on every request (static files included), a CSRF token
and a same-origin check on every POST, and headers that keep other sites from framing it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CHALLENGE = 'Basic realm="farm ui", charset="UTF-8"'
TOKEN_FIELD = "csrf_token"
# Everything the pages load comes from the console itself; nothing may frame it.
POLICY = (
    "default-src 'self'; img-src 'self'; media-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # pages and outputs are private
]


class BasicAuth:
    """ASGI middleware: any HTTP request without the user and password gets 401."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self.expected = _digest(f"{user}:{password}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(Headers(scope=scope)):
            refusal = PlainTextResponse(
                "farm ui: log in with FARM_FLOWER_USER and FARM_FLOWER_PASSWORD.",
                status_code=401,
                headers={"WWW-Authenticate": CHALLENGE},
            )
            await refusal(scope, receive, _with_headers(send))
            return
        await self.app(scope, receive, _with_headers(send) if scope["type"] == "http" else send)

    def allowed(self, headers: Headers) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # Digests, so that neither the length nor the bytes of the secret show in the timing.
        return hmac.compare_digest(_digest(given), self.expected)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _with_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
        await send(message)

    return sending


class Csrf:
    """Stateless tokens: an HMAC of the form's action under a secret of this process, so a
    token works for one action only and none survives a restart."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def token(self, action: str) -> str:
        return hmac.new(self.secret, action.encode(), hashlib.sha256).hexdigest()

    async def check(self, request: Request) -> None:
        """403 unless the POST comes from one of our pages and carries its action's token."""
        if not same_origin(request):
            raise HTTPException(403, "Refused: the request did not come from this console.")
        given = (await request.form()).get(TOKEN_FIELD)
        expected = self.token(request.url.path)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(403, "Refused: the form's token is missing or wrong; reload.")


def same_origin(request: Request) -> bool:
    """The browser's Origin (or else Referer) names this server; a client that sends neither
    (not a browser, so not a cross-site form) is left to the token."""
    ours = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == ours
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == ours
    return True
