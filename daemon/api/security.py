"""Who may use the API: the token, the Host check on loopback, no cross-site writes, a small body
limit, response headers - all in :class:`Gate`, a plain ASGI middleware that decides from the request
line and headers, before a byte of the body is read.

The server binds 127.0.0.1 unless configured otherwise; any other address needs a token
(``[api] token`` or ``token_file``; at least 16 printable ASCII characters, see
:func:`knitwatch.config.settings.api_token_problem`), which every ``/api/...`` and ``/metrics`` request
(the OpenAPI schema included) must carry as ``Authorization: Bearer <token>`` (compared in constant
time; an empty bearer never matches); a token configured on loopback is required all the same.
``/healthz`` and the page's static files need none (they hold no data; the page asks for the token and
keeps it in the browser's local storage). On a loopback bind without a token only ``Host: 127.0.0.1 |
localhost | [::1]`` is served (no DNS rebinding). A POST (any method but GET/HEAD/OPTIONS) from a
browser page of another origin is refused: an ``Origin`` that is not this server (``null`` included:
sandboxed iframes, ``data:`` and ``file:`` pages) or ``Sec-Fetch-Site: cross-site | same-site``.
Request bodies over :data:`MAX_BODY_BYTES` are refused with 413: from ``Content-Length`` before reading,
and while streaming when there is none (chunked).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from knitwatch.config.settings import _is_loopback, api_token_problem

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024  # the API takes only small JSON (an acknowledge, a keep mark)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'",
}

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
UNAUTHORIZED = "missing or wrong API token (Authorization: Bearer <token>)"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="knitwatch"'}


class ApiError(Exception):
    """The API cannot be started as configured (unreadable token file, address in use ...)."""


def load_token(api: Any) -> str | None:  # noqa: ANN401 - an ApiConfig
    """The configured token (``token`` or the first line of ``token_file``), or None. ApiError when the
    file cannot be read or its token is empty, short or not printable ASCII: the API must not start
    unprotected (the message names the file, never the token)."""
    if api.token:
        token = str(api.token).strip()
        where = "[api] token"
    elif api.token_file:
        path = Path(api.token_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiError(f"cannot read the API token file {path}: {e}") from e
        token = lines[0].strip() if lines else ""
        if not token:
            raise ApiError(f"the API token file {path} is empty")
        where = f"the API token in {path}"
    else:
        return None
    problem = api_token_problem(token)
    if problem:
        raise ApiError(f"{where} {problem}")
    return token


def token_matches(given: str | bytes, token: str) -> bool:
    """Whether the Bearer value ``given`` is ``token``: never for an empty one; in constant time (the
    digests are compared, so not even the length shows)."""
    raw = given.encode("latin-1", "replace") if isinstance(given, str) else given
    raw = raw.strip()
    if not raw or not token:
        return False
    return hmac.compare_digest(hashlib.sha256(raw).digest(), hashlib.sha256(token.encode()).digest())


def bearer_ok(authorization: str, token: str) -> bool:
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and token_matches(given, token)


def is_protected(path: str) -> bool:
    """Paths that need the token when one is set: the API (its schema included) and the metrics."""
    return path.startswith("/api/") or path in ("/api", "/metrics") or path.startswith("/metrics/")


def host_check_needed(token: str | None, host: str) -> bool:
    """Whether requests must name a loopback Host: a loopback bind without a token."""
    return token is None and _is_loopback(host)


def cross_site(method: str, headers: Headers) -> bool:
    """A state-changing request from a browser page of another origin (``Origin: null`` included)."""
    if method in SAFE_METHODS:
        return False
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False  # not from a browser page (curl, the CLI) or a same-origin GET-style request
    origin = origin.strip().lower()
    if origin == "null" or not origin:
        return True
    return urlsplit(origin).netloc != headers.get("host", "").strip().lower()


CLOSE = {"Connection": "close"}  # on a refusal with a body on its way: do not read (and drop) the rest


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: this API takes at most {limit} bytes", headers=CLOSE)


class Gate:
    """The ASGI middleware in front of every route: Host check (when ``check_host``), no cross-site
    writes, the token on protected paths, the body limit; then the security headers on every answer.
    Every refusal is decided from the headers alone, before the body is read."""

    def __init__(self, app: ASGIApp, *, token: str | None, check_host: bool,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.token = token
        self.check_host = check_host
        self.max_body = max_body

    def refusal(self, scope: MutableMapping[str, Any], headers: Headers) -> JSONResponse | None:
        if self.check_host:
            name = (headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if name and name not in LOOPBACK_NAMES and not _is_loopback(name):
                return JSONResponse({"detail": "unknown Host (this API serves only localhost)"}, status_code=421)
        if cross_site(scope["method"], headers):
            return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
        if self.token is not None and is_protected(scope["path"]):
            if not bearer_ok(headers.get("authorization", ""), self.token):
                return JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers=CHALLENGE)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
            if int(length) > self.max_body:
                return JSONResponse({"detail": BodyTooLarge(self.max_body).detail}, status_code=413)
        return None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0

        async def send_secured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                                        if k.lower().encode() not in names)]
            await send(message)

        headers = Headers(scope=scope)
        refused = self.refusal(scope, headers)
        if refused is not None:
            if "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0"):
                refused.headers.update(CLOSE)
            await refused(scope, receive, send_secured)
        else:
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, receive_limited, send_secured)
            except BodyTooLarge as e:  # read outside a route (a route's own read answers 413 itself)
                if status:
                    raise
                await JSONResponse({"detail": e.detail}, status_code=413, headers=CLOSE)(scope, receive,
                                                                                         send_secured)
        log.debug("http", method=scope["method"], path=scope["path"], status=status,
                  ms=round((time.perf_counter() - t0) * 1000, 2))


def require_token(request: Request) -> None:
    """Dependency of every protected route (behind :class:`Gate`'s own check): the app's token
    (``app.state.token``) as a Bearer token."""
    token: str | None = request.app.state.token
    if token is None:
        return
    if not bearer_ok(request.headers.get("authorization", ""), token):
        raise HTTPException(401, UNAUTHORIZED, headers=CHALLENGE)
