"""What the API's JSON answers may say about the server: no absolute paths.

Event records, store errors and the daemon's stats name files (the event folder, the checkpoint, the
store); an answer gives such a path relative to the store when it lies inside it (``events/2024-05-01/
00000042``) and by its last name otherwise (``efficientad-s.pt``). The API's own URLs (``/api/...``,
``/static/...``) and what people typed (``by``, ``note``) are left as they are. Every JSON answer passes
through :class:`Redactor` (the app's default response class, its error handlers and ``/healthz``);
validation errors are answered as one sentence per field, never with the input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# an absolute path: a slash not inside a word, a URL or a relative path, then characters a path has
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])/[^\s'\"`<>|,;()\[\]{}=:*?]+")
URL_ROOTS = frozenset({"api", "static", "metrics", "healthz", "favicon.ico"})
VERBATIM_KEYS = frozenset({"urls", "url", "by", "note", "fp_by", "fp_note"})
MAX_ERRORS = 10


class Redactor:
    """Rewrites absolute paths in JSON-ready values (see the module's doc)."""

    def __init__(self, roots: Iterable[Path]) -> None:
        prefixes: set[str] = set()
        for root in roots:
            for p in (Path(root).absolute(), Path(root).resolve()):
                if str(p) != "/":
                    prefixes.add(str(p).rstrip("/"))
        self.roots = sorted(prefixes, key=len, reverse=True)

    def path(self, p: str) -> str:
        for root in self.roots:
            if p == root:
                return Path(root).name
            if p.startswith(root + "/"):
                return p[len(root) + 1:]
        name = p.rstrip("/").rsplit("/", 1)[-1]
        return name or "."

    def _sub(self, m: re.Match[str]) -> str:
        p = m.group(0)
        if p[1:].split("/", 1)[0] in URL_ROOTS:
            return p
        tail = ""
        while p and p[-1] in ".!":  # the end of a sentence is not part of the path
            p, tail = p[:-1], p[-1] + tail
        return self.path(p) + tail if p else m.group(0)

    def text(self, s: str) -> str:
        return _ABS_PATH.sub(self._sub, s) if "/" in s else s

    def value(self, obj: Any) -> Any:  # noqa: ANN401 - any JSON value
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {k: v if k in VERBATIM_KEYS else self.value(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.value(v) for v in obj]
        return obj


def response_class(redactor: Redactor) -> type[JSONResponse]:
    """A JSONResponse that passes its content through ``redactor``: the app's default response class."""

    class PublicJSONResponse(JSONResponse):
        def render(self, content: Any) -> bytes:  # noqa: ANN401
            return super().render(redactor.value(content))

    return PublicJSONResponse


def validation_message(exc: RequestValidationError) -> dict[str, Any]:
    """A 422 answer that names each bad field and says what is wrong, without the input (FastAPI's
    default echoes it back, however large)."""
    errors = []
    for err in exc.errors()[:MAX_ERRORS]:
        loc = [str(p) for p in err.get("loc", ())]
        errors.append({"loc": loc, "msg": str(err.get("msg", "invalid"))[:200], "type": str(err.get("type", ""))})
    more = len(exc.errors()) - len(errors)
    detail = "; ".join(f"{'.'.join(e['loc']) or 'request'}: {e['msg']}" for e in errors)
    if more > 0:
        detail += f"; and {more} more"
    return {"detail": detail, "errors": errors}


def install_error_handlers(app: Any, json_response: type[JSONResponse]) -> None:  # noqa: ANN401 - a FastAPI app
    """HTTP errors, validation errors and unexpected failures answered as JSON through ``json_response``."""

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return json_response({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return json_response(validation_message(exc), status_code=422)

    async def failure(_request: Request, _exc: Exception) -> JSONResponse:
        return json_response({"detail": "internal error (see the daemon's log)"}, status_code=500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, failure)
