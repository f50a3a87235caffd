"""The HTTP API and the web gallery, served by the daemon (FastAPI on uvicorn, a thread of the supervisor).

Endpoints (JSON unless noted)::

    GET  /                              the web page (static files under /static/)
    GET  /healthz                       200 when every stage is healthy, else 503 (no token needed)
    GET  /metrics                       Prometheus text format
    GET  /api/stats                     the supervisor's stats plus the latch, the store and per-camera last defect
    GET  /api/events                    events, newest first: camera, since, until, severity, action,
                                        acknowledged, keep, false_positive, limit (<= 500), offset
    GET  /api/events/{id}               one event with its full JSON record
    GET  /api/events/{id}/{kind}        its picture: frame (PNG) | overlay (JPEG) | mask (PNG) | thumb (JPEG)
    POST /api/events/{id}/keep          {"keep": true|false} - retention never deletes a kept event
    POST /api/events/{id}/false-positive {"value": true|false, "by": "...", "note": "..."} - retraining feedback
    GET  /api/alarm                     the latch (cameras with unacknowledged stops / alarms) and recent acks
    POST /api/alarm/ack                 {"by": "...", "camera": null|"id", "note": "..."}; ?wait=S waits for the
                                        alert stage to apply it (reset the latch, clear the PLC's stop output)
    GET  /api/rolls                     rolls, newest first (limit, offset)
    GET  /api/rolls/{id|current}/report the roll report: defects, places, counts, points, grade (?format=csv,
                                        ?length_m=M)
    POST /api/rolls                     {"by": "...", "note": "..."}: a new roll; ?wait=S waits for the daemon
    GET  /api/models                    the model library (articles, versions, validation figures) and each
                                        camera's model; POST /api/models/use {"camera", "model": "ART[@N]"},
                                        POST /api/models/rollback {"camera"}: the daemon switches by itself
    GET  /api/learn                     learn jobs and their state; POST /api/learn {"camera", "article",
                                        "frames"|"minutes", "model"?, "steps"?, "use"?} starts one (record,
                                        train, validate, install); DELETE /api/learn/{camera} cancels it

Security (:mod:`knitwatch.daemon.api.security`): a token (16+ characters) when bound off loopback, only
loopback Host names on loopback without a token, no cross-site POSTs (``Origin: null`` included), request
bodies of at most 64 KiB, all decided from the headers before the body is read. Event ids are validated
(positive integers), file kinds come from a fixed list, and files are resolved only through the store's
index and checked to lie inside the store - no path from a request ever reaches the file system. Answers
(:mod:`~knitwatch.daemon.api.public`) carry no absolute paths and never echo invalid input. The OpenAPI
schema is at ``/api/openapi.json`` (behind the token when one is set); there is no docs page.

Modules: the routes per resource under :mod:`knitwatch.daemon.api.routes`, the request bodies in
:mod:`~knitwatch.daemon.api.schemas`, what the routes share (the daemon view, the store handle) in
:mod:`~knitwatch.daemon.api.deps`, the Prometheus collector in :mod:`~knitwatch.daemon.api.metrics`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from knitwatch.config import Settings
from knitwatch.config.settings import api_token_problem
from knitwatch.daemon.api.deps import DaemonView, StaticView, StoreHandle
from knitwatch.daemon.api.learnjobs import LearnJobs
from knitwatch.daemon.api.metrics import metrics_registry
from knitwatch.daemon.api.public import Redactor, install_error_handlers, response_class
from knitwatch.daemon.api.routes import alarm, events, models, rolls, status, web
from knitwatch.daemon.api.security import ApiError, Gate, host_check_needed, load_token
from knitwatch.models.articles import Library, library_dir
from knitwatch.pipeline.actions.latch import latch_dir_of

log = structlog.get_logger(__name__)


def create_app(settings: Settings, view: DaemonView | None = None, *, token: str | None = None,
               bound_host: str | None = None) -> FastAPI:
    """The FastAPI application for ``settings`` (its store, cameras and API section). ApiError when
    ``token`` is not usable (see :func:`knitwatch.config.settings.api_token_problem`)."""
    if token is not None:
        problem = api_token_problem(token)
        if problem:
            raise ApiError(f"the API token {problem}")
    view = view or StaticView()
    stores = StoreHandle(settings.store.path, fsync=settings.store.fsync)
    json_response = response_class(Redactor([settings.store.path]))
    # no docs page (its scripts come from a CDN the page's CSP refuses); the schema is behind the token
    app = FastAPI(title="knitwatch", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  default_response_class=json_response)
    app.state.view = view
    app.state.stores = stores
    app.state.latch_dir = latch_dir_of(settings.store)  # the latch file: what is latched, acks without the index
    app.state.cameras = [c.id for c in settings.cameras]
    app.state.token = token
    app.state.json_response = json_response
    app.state.metrics = metrics_registry(view, stores, app.state.latch_dir)
    app.add_middleware(Gate, token=token, check_host=host_check_needed(token, bound_host or settings.api.host))
    install_error_handlers(app, json_response)
    app.state.roll_settings = settings.roll  # the roll report's [roll] section
    # the model library, the cameras' models and the learn jobs (/api/models, /api/learn)
    app.state.library = Library(library_dir(settings))
    app.state.learn = LearnJobs(library_dir(settings), settings)
    app.state.configured_checkpoint = settings.model.checkpoint
    for module in (web, status, events, alarm, rolls, models):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.WEB_DIR, check_dir=False), name="static")
    return app


# ---------------------------------------------------------------------------------------------- the server


def base_url(host: str, port: int) -> str:
    """The URL to reach a server bound to ``host:port`` from this machine."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class ApiServer:
    """uvicorn serving the app in a daemon thread; the socket is bound in :meth:`start` (so a port in
    use is an immediate :class:`ApiError`, and port 0 picks a free one)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def start(self, timeout: float = 10.0) -> ApiServer:
        import uvicorn

        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as e:
            raise ApiError(f"cannot listen on {self.host}:{self.port}: {e}") from e
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=2, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="knitwatch-api",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        stores = getattr(self.app.state, "stores", None)
        if stores is not None:
            stores.close()
        learn = getattr(self.app.state, "learn", None)
        if learn is not None:  # a stopping daemon cancels its learn jobs
            learn.close()


def start_api(settings: Settings, view: DaemonView) -> ApiServer:
    """Build and start the API for the daemon's settings (ApiError when it cannot serve as configured)."""
    token = load_token(settings.api)
    app = create_app(settings, view, token=token)
    server = ApiServer(app, settings.api.host, settings.api.port).start()
    log.info("HTTP API and web page serving", url=server.url + "/", token_required=token is not None)
    return server
