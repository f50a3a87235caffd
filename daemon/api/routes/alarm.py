"""``/api/alarm``: the latch (cameras with unacknowledged stops / alarms) and its acknowledge."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query

from knitwatch.daemon.api.deps import StoreHandle, get_cameras, get_stores
from knitwatch.daemon.api.schemas import AckBody
from knitwatch.daemon.api.security import require_token

log = structlog.get_logger(__name__)

router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/api/alarm")
def alarm(stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    store = stores.get()
    latched = store.latched()
    return {**latched, "latched": bool(latched["stop"] or latched["alarm"]),
            "events": store.latched_events(), "acks": store.list_acks(limit=10)}


@router.post("/api/alarm/ack")
async def ack(body: AckBody | None = None,
              wait: float = Query(0.0, ge=0, le=30, description="seconds to wait until it is applied"),
              stores: StoreHandle = Depends(get_stores), cameras: list[str] = Depends(get_cameras),
              ) -> dict[str, Any]:
    body = body or AckBody()
    if body.camera is not None and body.camera not in cameras:
        raise HTTPException(400, f"unknown camera {body.camera!r} (configured: {', '.join(cameras)})")
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
