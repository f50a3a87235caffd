"""Who may use the API: the token, the Host check on loopback, no cross-site POSTs, response headers.

The server binds 127.0.0.1 unless configured otherwise; any other address needs a token
(``[api] token`` or ``token_file``), which every ``/api/...`` and ``/metrics`` request must carry as
``Authorization: Bearer <token>`` (compared in constant time); a token configured on loopback is
required all the same. ``/healthz`` and the page's static files need none (they hold no data; the page
asks for the token and keeps it in the browser's local storage). On a loopback bind without a token
only ``Host: 127.0.0.1 | localhost | [::1]`` is served (no DNS rebinding), and a browser POST from
another origin is refused (no cross-site requests).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from knitwatch.config.settings import _is_loopback

log = structlog.get_logger(__name__)

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'",
}

Guard = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


class ApiError(Exception):
    """The API cannot be started as configured (unreadable token file, address in use ...)."""


def load_token(api: Any) -> str | None:  # noqa: ANN401 - an ApiConfig
    """The configured token (``token`` or the first line of ``token_file``), or None. ApiError when the
    file cannot be read or is empty: the API must not start unprotected."""
    if api.token:
        token = str(api.token).strip()
    elif api.token_file:
        path = Path(api.token_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiError(f"cannot read the API token file {path}: {e}") from e
        token = lines[0].strip() if lines else ""
        if not token:
            raise ApiError(f"the API token file {path} is empty")
    else:
        return None
    if len(token) < 16:
        log.warning("the API token is short: use at least 16 random characters (openssl rand -hex 32)")
    return token


def host_check_needed(token: str | None, host: str) -> bool:
    """Whether requests must name a loopback Host: a loopback bind without a token."""
    return token is None and _is_loopback(host)


def guard(check_host: bool) -> Guard:
    """The HTTP middleware: Host check (when ``check_host``), no cross-origin writes, security headers."""

    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        if check_host:
            name = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if name and name not in LOOPBACK_NAMES and not _is_loopback(name):
                return JSONResponse({"detail": "unknown Host (this API serves only localhost)"}, status_code=421)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin and origin != "null":
            if urlsplit(origin).netloc.lower() != (request.headers.get("host") or "").lower():
                return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
        response = await call_next(request)
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        log.debug("http", method=request.method, path=request.url.path, status=response.status_code,
                  ms=round((time.perf_counter() - t0) * 1000, 2))
        return response

    return middleware


def require_token(request: Request) -> None:
    """Dependency of every protected route: the app's token (``app.state.token``) as a Bearer token."""
    token: str | None = request.app.state.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong API token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": 'Bearer realm="knitwatch"'})
