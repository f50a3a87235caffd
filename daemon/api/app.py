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

Security. The server binds 127.0.0.1 unless configured otherwise; any other address needs a token
(``[api] token`` or ``token_file``), which every ``/api/...`` and ``/metrics`` request must carry as
``Authorization: Bearer <token>`` (compared in constant time); a token configured on loopback is
required all the same. ``/healthz`` and the page's static files need none (they hold no data; the page
asks for the token and keeps it in the browser's local storage). On a loopback bind without a token
only ``Host: 127.0.0.1 | localhost | [::1]`` is served (no DNS rebinding), and a browser POST from
another origin is refused (no cross-site requests). Event ids are validated (positive integers), file
kinds come from a fixed list, and files are resolved only through the store's index and checked to lie
inside the store - no path from a request ever reaches the file system.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from knitwatch.config import Settings
from knitwatch.daemon.cli.ops import parse_time
from knitwatch.pipeline.store.database import FILE_KINDS, MAX_PAGE, Store, StoreError, iso_utc, parse_event_id

log = structlog.get_logger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
MEDIA_TYPES = {"frame": "image/png", "overlay": "image/jpeg", "mask": "image/png", "thumb": "image/jpeg"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class ApiError(Exception):
    """The API cannot be started as configured (unreadable token file, address in use ...)."""


class DaemonView(Protocol):
    """What the API reads from the daemon (the supervisor implements it)."""

    def stats_snapshot(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


class StaticView:
    """A fixed stats snapshot and health: for serving a store without a running daemon (and tests)."""

    def __init__(self, snapshot: dict[str, Any] | None = None, healthy: bool = False) -> None:
        self.snapshot = snapshot or {}
        self.healthy = healthy

    def stats_snapshot(self) -> dict[str, Any]:
        return self.snapshot

    def health(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "ready": bool(self.snapshot.get("ready", self.healthy)), "stages": {}}


# ---------------------------------------------------------------------------------------------- token


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- store


class StoreHandle:
    """Opens the store lazily (the alert stage creates it at start) and keeps it open."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._store: Store | None = None
        self._lock = threading.Lock()

    def get(self) -> Store:
        with self._lock:
            if self._store is None:
                try:
                    self._store = Store(self.path, create=False, fsync=self.fsync)
                except StoreError as e:
                    raise HTTPException(503, f"the defect store is not available: {e}") from None
            return self._store

    def peek(self) -> Store | None:
        try:
            return self.get()
        except HTTPException:
            return None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


# ---------------------------------------------------------------------------------------------- bodies


class KeepBody(BaseModel):
    keep: bool = True


class FalsePositiveBody(BaseModel):
    value: bool = True
    by: str = Field("", max_length=200)
    note: str = Field("", max_length=2000)


class AckBody(BaseModel):
    by: str = Field("web", max_length=200)
    camera: str | None = Field(None, max_length=32)
    note: str = Field("", max_length=2000)


# ---------------------------------------------------------------------------------------------- metrics


class DaemonCollector:
    """Prometheus metrics read from the daemon's stats at scrape time."""

    def __init__(self, view: DaemonView, stores: StoreHandle) -> None:
        self.view = view
        self.stores = stores

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self.view.stats_snapshot() or {}
        health = self.view.health()

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"knitwatch_{name}", doc, labels=labels or [])

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"knitwatch_{name}", doc, labels=labels or [])

        up = gauge("healthy", "1 when every stage is alive, ready and sending heartbeats")
        up.add_metric([], 1.0 if health.get("healthy") else 0.0)
        yield up
        ready = gauge("ready", "1 once the model is loaded and the cameras run")
        ready.add_metric([], 1.0 if health.get("ready") else 0.0)
        yield ready
        if "uptime_s" in snap:
            g = gauge("uptime_seconds", "seconds since the daemon started")
            g.add_metric([], float(snap["uptime_s"]))
            yield g

        cams = snap.get("cameras") or {}
        fams = {
            "fps": gauge("camera_fps", "frames captured per second (recent window)", ["camera"]),
            "coverage": gauge("inspection_coverage_ratio", "frames inspected / captured (recent window)", ["camera"]),
            "captured": counter("frames_captured", "frames captured", ["camera"]),
            "inspected": counter("frames_inspected", "frames inspected", ["camera"]),
            "dropped": counter("frames_dropped", "frames dropped at capture (inspection behind)", ["camera"]),
            "events": counter("defect_events", "defect events since the daemon started", ["camera"]),
            "latency": gauge("latency_seconds", "capture -> decision latency percentiles", ["camera", "quantile"]),
        }
        for cam, c in sorted(cams.items()):
            if c.get("fps") is not None:
                fams["fps"].add_metric([cam], float(c["fps"]))
            if c.get("coverage") is not None:
                fams["coverage"].add_metric([cam], float(c["coverage"]))
            for key in ("captured", "inspected", "dropped", "events"):
                if c.get(key) is not None:
                    fams[key].add_metric([cam], float(c[key]))
            for q, v in (c.get("latency_ms") or {}).items():
                if q.startswith("p") and q[1:].isdigit():
                    fams["latency"].add_metric([cam, f"{int(q[1:]) / 100:g}"], float(v) / 1000.0)
        yield from fams.values()

        stages = snap.get("stages") or {}
        restarts = counter("stage_restarts", "restarts of a stage process", ["stage"])
        alive = gauge("stage_up", "1 while the stage process is alive", ["stage"])
        model = gauge("model_batch_seconds", "model time per batch (p50/p99) of an inference worker",
                      ["stage", "quantile"])
        for name, s in sorted(stages.items()):
            restarts.add_metric([name], float(s.get("restarts", 0)))
            alive.add_metric([name], 1.0 if s.get("alive") else 0.0)
            for q, v in (s.get("model_ms") or {}).items():
                if q.startswith("p") and q[1:].isdigit():
                    model.add_metric([name, f"{int(q[1:]) / 100:g}"], float(v) / 1000.0)
        yield restarts
        yield alive
        yield model

        actions = (stages.get("alert") or {}).get("actions") or {}
        if actions:
            plc = gauge("plc_connected", "1 while the PLC answers", ["driver"])
            plc.add_metric([str(actions.get("driver", ""))], 1.0 if actions.get("plc_connected") else 0.0)
            yield plc
            fails = counter("plc_failures", "failed PLC requests (retried)")
            fails.add_metric([], float(actions.get("failures", 0)))
            yield fails
        store = self.stores.peek()
        if store is not None:
            try:
                latched = store.latched()
                st = store.stats()
            except StoreError:
                latched, st = None, None
            if latched is not None:
                lat = gauge("alarm_latched", "1 while a camera has an unacknowledged stop / alarm",
                            ["camera", "action"])
                for cam in sorted(cams) or []:
                    for action in ("stop", "alarm"):
                        lat.add_metric([cam, action], 1.0 if cam in latched.get(action, []) else 0.0)
                yield lat
            if st is not None and st.get("events", -1) >= 0:
                g = gauge("store_events", "events in the defect store")
                g.add_metric([], float(st["events"]))
                yield g
                g = gauge("store_bytes", "bytes of event pictures in the defect store")
                g.add_metric([], float(st["bytes"]))
                yield g

        gpu = snap.get("gpu") or {}
        devices = [d for d in gpu.get("devices", []) if "error" not in d]
        if devices:
            util = gauge("gpu_utilization_ratio", "GPU utilisation (NVML)", ["gpu", "name"])
            used = gauge("gpu_memory_used_bytes", "GPU memory used, all processes (NVML)", ["gpu", "name"])
            total = gauge("gpu_memory_total_bytes", "GPU memory (NVML)", ["gpu", "name"])
            for d in devices:
                labels = [str(d["index"]), str(d.get("name", ""))]
                if "utilization_percent" in d:
                    util.add_metric(labels, d["utilization_percent"] / 100.0)
                used.add_metric(labels, float(d["memory_used_bytes"]))
                total.add_metric(labels, float(d["memory_total_bytes"]))
            yield util
            yield used
            yield total
        cuda = gpu.get("cuda_memory_allocated_bytes") or {}
        if cuda:
            g = gauge("cuda_memory_allocated_bytes", "CUDA memory allocated by PyTorch in an inference worker",
                      ["stage"])
            for name, b in sorted(cuda.items()):
                g.add_metric([name], float(b))
            yield g


# ---------------------------------------------------------------------------------------------- the app


def _event_summary(e: dict[str, Any]) -> dict[str, Any]:
    eid = e["id"]
    e["urls"] = {k: f"/api/events/{eid}/{k}" for k, ok in e.get("files", {}).items() if ok}
    return e


def create_app(settings: Settings, view: DaemonView | None = None, *, token: str | None = None,
               bound_host: str | None = None) -> FastAPI:
    """The FastAPI application for ``settings`` (its store, cameras and API section)."""
    view = view or StaticView()
    stores = StoreHandle(settings.store.path, fsync=settings.store.fsync)
    cameras = [c.id for c in settings.cameras]
    host = bound_host or settings.api.host
    check_host = token is None and _is_loopback(host)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(view, stores))

    app = FastAPI(title="knitwatch", version="1", docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.stores = stores

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
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
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'")
        log.debug("http", method=request.method, path=request.url.path, status=response.status_code,
                  ms=round((time.perf_counter() - t0) * 1000, 2))
        return response

    def auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong API token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": 'Bearer realm="knitwatch"'})

    def event_id(event_id: str) -> int:
        try:
            return parse_event_id(event_id)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    def camera_arg(camera: str | None) -> str | None:
        if camera is not None and camera not in cameras:
            raise HTTPException(400, f"unknown camera {camera!r} (configured: {', '.join(cameras)})")
        return camera

    def time_arg(value: str | None, name: str) -> int | None:
        if value is None or value == "":
            return None
        try:
            return parse_time(value)
        except ValueError as e:
            raise HTTPException(400, f"{name}: {e}") from None

    protected = [Depends(auth)]

    # -------------------------------------------------------------- page, health, metrics
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            raise HTTPException(500, f"the web page's files are not installed ({WEB_DIR}); the API works")
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        h = view.health()
        body = {"status": "ok" if h.get("healthy") else "unhealthy", **h}
        return JSONResponse(body, status_code=200 if h.get("healthy") else 503)

    @app.get("/metrics", dependencies=protected)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------- stats
    @app.get("/api/stats", dependencies=protected)
    def stats() -> dict[str, Any]:
        snap = dict(view.stats_snapshot() or {})
        health = view.health()
        cams_snap = snap.get("cameras") or {}
        store = stores.peek()
        latched = {"stop": [], "alarm": []}
        store_stats: dict[str, Any] | None = None
        last: dict[str, Any] = {}
        if store is not None:
            try:
                latched = store.latched()
                store_stats = store.stats()
                for cam in cameras:
                    items = store.list_events(camera=cam, limit=1)["items"]
                    if items:
                        last[cam] = _event_summary(items[0])
            except StoreError as e:
                store_stats = {"error": str(e)}
        out_cams = {}
        for cam in cameras:
            c = dict(cams_snap.get(cam) or {})
            c["latched"] = {"stop": cam in latched.get("stop", []), "alarm": cam in latched.get("alarm", [])}
            c["last_event"] = last.get(cam)
            out_cams[cam] = c
        snap.update(
            cameras=out_cams,
            healthy=bool(health.get("healthy")),
            ready=bool(health.get("ready")),
            alarm={**latched, "latched": bool(latched.get("stop") or latched.get("alarm"))},
            store=store_stats,
            time=iso_utc(time.time_ns()),
        )
        return snap

    # -------------------------------------------------------------- events
    @app.get("/api/events", dependencies=protected)
    def list_events(
        camera: str | None = Query(None, pattern=r"^[A-Za-z0-9_-]{1,32}$",
                                   description="camera id (also of cameras no longer configured)"),
        since: str | None = Query(None, description="ISO time, epoch seconds, or an age like 30m, 2h, 7d"),
        until: str | None = Query(None, description="same forms as since"),
        severity: str | None = Query(None, pattern=r"^[A-Za-z0-9_-]{1,32}$"),
        action: str | None = Query(None, pattern=r"^(stop|alarm|log)$"),
        acknowledged: bool | None = None,
        keep: bool | None = None,
        false_positive: bool | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> dict[str, Any]:
        store = stores.get()
        res = store.list_events(camera=camera, since_ns=time_arg(since, "since"),
                                until_ns=time_arg(until, "until"), severity=severity, action=action,
                                acknowledged=acknowledged, keep=keep, false_positive=false_positive, limit=limit,
                                offset=offset)
        res["items"] = [_event_summary(e) for e in res["items"]]
        nxt = res["offset"] + len(res["items"])
        res["next_offset"] = nxt if nxt < res["total"] else None
        return res

    @app.get("/api/events/{event_id}", dependencies=protected)
    def get_event(eid: int = Depends(event_id)) -> dict[str, Any]:
        e = stores.get().get_event(eid)
        if e is None:
            raise HTTPException(404, f"no event {eid}")
        return _event_summary(e)

    @app.get("/api/events/{event_id}/{kind}", dependencies=protected)
    def event_file(kind: str, eid: int = Depends(event_id)) -> FileResponse:
        if kind not in FILE_KINDS:
            raise HTTPException(400, f"file kind must be one of {', '.join(FILE_KINDS)}")
        store = stores.get()
        path = store.file_path(eid, kind)
        if path is None:
            raise HTTPException(404, f"event {eid} has no {kind} picture")
        return FileResponse(path, media_type=MEDIA_TYPES[kind],
                            headers={"Cache-Control": "private, max-age=3600"},
                            filename=f"knitwatch-event-{eid}-{path.name}", content_disposition_type="inline")

    @app.post("/api/events/{event_id}/keep", dependencies=protected)
    def keep_event(body: KeepBody | None = None, eid: int = Depends(event_id)) -> dict[str, Any]:
        body = body or KeepBody()
        if not stores.get().set_keep(eid, body.keep):
            raise HTTPException(404, f"no event {eid}")
        log.info("event keep set over the API", event_id=eid, keep=body.keep)
        return {"id": eid, "keep": body.keep}

    @app.post("/api/events/{event_id}/false-positive", dependencies=protected)
    def false_positive(body: FalsePositiveBody | None = None, eid: int = Depends(event_id)) -> dict[str, Any]:
        body = body or FalsePositiveBody()
        if not stores.get().mark_false_positive(eid, body.value, by=body.by, note=body.note):
            raise HTTPException(404, f"no event {eid}")
        log.info("event marked over the API", event_id=eid, false_positive=body.value, by=body.by)
        return {"id": eid, "false_positive": body.value}

    # -------------------------------------------------------------- the latch
    @app.get("/api/alarm", dependencies=protected)
    def alarm() -> dict[str, Any]:
        store = stores.get()
        latched = store.latched()
        return {**latched, "latched": bool(latched["stop"] or latched["alarm"]),
                "events": store.latched_events(), "acks": store.list_acks(limit=10)}

    @app.post("/api/alarm/ack", dependencies=protected)
    async def ack(body: AckBody | None = None,
                  wait: float = Query(0.0, ge=0, le=30, description="seconds to wait until it is applied")
                  ) -> dict[str, Any]:
        body = body or AckBody()
        camera_arg(body.camera)
        store = stores.get()
        before = await asyncio.to_thread(store.latched)
        ack_id = await asyncio.to_thread(store.request_ack, body.by or "web", body.camera, body.note)
        log.info("acknowledge requested over the API", ack_id=ack_id, by=body.by, camera=body.camera or "all")
        deadline = time.monotonic() + wait
        row = await asyncio.to_thread(store.get_ack, ack_id)
        while wait and time.monotonic() < deadline and row is not None and row["cleared_ns"] is None:
            await asyncio.sleep(0.1)
            row = await asyncio.to_thread(store.get_ack, ack_id)
        after = await asyncio.to_thread(store.latched)
        return {"ack_id": ack_id, "latched_before": before, "latched": after,
                "applied": bool(row and row["handled_ns"]), "cleared": bool(row and row["cleared_ns"]), "ack": row}

    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> RedirectResponse:
        return RedirectResponse("/static/favicon.svg")

    return app


# ---------------------------------------------------------------------------------------------- the server


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
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

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


def start_api(settings: Settings, view: DaemonView) -> ApiServer:
    """Build and start the API for the daemon's settings (ApiError when it cannot serve as configured)."""
    token = load_token(settings.api)
    app = create_app(settings, view, token=token)
    server = ApiServer(app, settings.api.host, settings.api.port).start()
    log.info("HTTP API and web page serving", url=server.url + "/", token_required=token is not None)
    return server
