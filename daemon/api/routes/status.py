"""The daemon's state: ``/healthz`` (no token), ``/metrics`` (Prometheus) and ``/api/stats``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from knitwatch.daemon.api.deps import DaemonView, StoreHandle, get_cameras, get_stores, get_view
from knitwatch.daemon.api.routes.alarm import latch_now
from knitwatch.daemon.api.routes.events import event_summary
from knitwatch.daemon.api.security import require_token
from knitwatch.pipeline.store.database import StoreError, iso_utc

router = APIRouter()
protected = [Depends(require_token)]


@router.get("/healthz")
def healthz(request: Request, view: DaemonView = Depends(get_view)) -> JSONResponse:
    h = view.health()
    # degraded (PLC unreachable, store unusable ...: the reasons in "degraded") answers 503 as well
    state = "unhealthy" if not h.get("healthy") else "degraded" if h.get("degraded") else "ok"
    body = {"status": state, **h}
    answer: type[JSONResponse] = request.app.state.json_response
    return answer(body, status_code=200 if state == "ok" else 503)


@router.get("/metrics", dependencies=protected)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/stats", dependencies=protected)
def stats(request: Request, view: DaemonView = Depends(get_view), stores: StoreHandle = Depends(get_stores),
          cameras: list[str] = Depends(get_cameras)) -> dict[str, Any]:
    snap = dict(view.stats_snapshot() or {})
    health = view.health()
    cams_snap = snap.get("cameras") or {}
    store = stores.peek()
    store_stats: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    latched = latch_now(request.app.state.latch_dir, view, store)  # the latch file's, right without the index
    if store is not None:
        try:
            store_stats = store.stats()
            for cam in cameras:
                items = store.list_events(camera=cam, limit=1)["items"]
                if items:
                    last[cam] = event_summary(items[0])
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
        degraded=list(health.get("degraded") or []),
        alarm=latched,
        store=store_stats,
        time=iso_utc(time.time_ns()),
    )
    return snap
