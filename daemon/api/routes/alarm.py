"""``/api/alarm``: the latch (cameras with unacknowledged stops / alarms) and its acknowledge.

The latch shown is the action runner's own record (the latch file), so it is right while the store's
index is unusable; an acknowledge goes to the index, or - when that cannot take it - to the latch
folder's mailbox, which the daemon reads as well."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request

from knitwatch.daemon.api.deps import DaemonView, StoreHandle, get_cameras, get_stores, get_view
from knitwatch.daemon.api.schemas import AckBody
from knitwatch.daemon.api.security import require_token
from knitwatch.pipeline.actions.latch import LatchFileError, current_latch, post_ack_request, read_view
from knitwatch.pipeline.store.database import Store, StoreError

log = structlog.get_logger(__name__)

router = APIRouter(dependencies=[Depends(require_token)])


def _live(view: DaemonView) -> dict[str, Any] | None:
    """The running action runner's stats (the alert stage's), when the daemon reports them."""
    return ((view.stats_snapshot() or {}).get("stages") or {}).get("alert", {}).get("actions") or None


def latch_now(latch_dir: Path, view: DaemonView, store: Store | None) -> dict[str, Any]:
    """The latch as it is: the latch file's (the action runner's own record), else the daemon's, else the
    index's (:func:`knitwatch.pipeline.actions.latch.current_latch`)."""
    index = events = None
    if store is not None:
        try:
            index, events = store.latched(), store.latched_events()
        except StoreError:
            pass
    return current_latch(read_view(latch_dir), _live(view), index, events)


def _cameras(latch: dict[str, Any]) -> dict[str, list[str]]:
    return {"stop": latch["stop"], "alarm": latch["alarm"]}


@router.get("/api/alarm")
def alarm(request: Request, stores: StoreHandle = Depends(get_stores),
          view: DaemonView = Depends(get_view)) -> dict[str, Any]:
    store = stores.peek()
    acks: list[dict[str, Any]] = []
    if store is not None:
        with contextlib.suppress(StoreError):
            acks = store.list_acks(limit=10)
    return {**latch_now(request.app.state.latch_dir, view, store), "acks": acks}


@router.post("/api/alarm/ack")
async def ack(request: Request, body: AckBody | None = None,
              wait: float = Query(0.0, ge=0, le=30, description="seconds to wait until it is applied"),
              stores: StoreHandle = Depends(get_stores), cameras: list[str] = Depends(get_cameras),
              view: DaemonView = Depends(get_view)) -> dict[str, Any]:
    body = body or AckBody()
    if body.camera is not None and body.camera not in cameras:
        raise HTTPException(400, f"unknown camera {body.camera!r} (configured: {', '.join(cameras)})")
    latch_dir: Path = request.app.state.latch_dir
    store = stores.peek()
    before = _cameras(await asyncio.to_thread(latch_now, latch_dir, view, store))
    ack_id: int | None = None
    if store is not None:
        with contextlib.suppress(StoreError):
            ack_id = await asyncio.to_thread(store.request_ack, body.by or "web", body.camera, body.note)
    if ack_id is None:  # the index cannot take it: the latch folder's mailbox does
        return await _ack_by_mailbox(latch_dir, view, body, wait, before)
    log.info("acknowledge requested over the API", ack_id=ack_id, by=body.by, camera=body.camera or "all")
    assert store is not None
    deadline = time.monotonic() + wait
    row = await asyncio.to_thread(store.get_ack, ack_id)
    while wait and time.monotonic() < deadline and row is not None and row["cleared_ns"] is None:
        await asyncio.sleep(0.1)
        row = await asyncio.to_thread(store.get_ack, ack_id)
    after = _cameras(await asyncio.to_thread(latch_now, latch_dir, view, store))
    return {"ack_id": ack_id, "latched_before": before, "latched": after,
            "applied": bool(row and row["handled_ns"]), "cleared": bool(row and row["cleared_ns"]), "ack": row}


async def _ack_by_mailbox(latch_dir: Path, view: DaemonView, body: AckBody, wait: float,
                          before: dict[str, Any]) -> dict[str, Any]:
    try:
        req = await asyncio.to_thread(post_ack_request, latch_dir, by=body.by or "web", camera=body.camera,
                                      note=body.note, covers_seq=read_view(latch_dir)["latch_seq"])
    except (OSError, LatchFileError) as e:
        log.error("cannot record an acknowledge: neither the index nor the latch folder takes it", error=str(e))
        raise HTTPException(503, "cannot record the acknowledge: the store's index and the latch folder are both "
                                 "unusable (see the daemon's log)") from None
    token = req["token"]
    log.warning("acknowledge requested over the API, recorded in the latch folder's mailbox", ack=token,
                by=body.by, camera=body.camera or "all")
    deadline = time.monotonic() + wait
    entry: dict[str, Any] | None = None
    while True:
        entry = next((a for a in read_view(latch_dir)["acks"] if a.get("token") == token), None)
        if (entry is not None and entry.get("cleared_ns")) or not wait or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    after = _cameras(await asyncio.to_thread(latch_now, latch_dir, view, None))
    return {"ack_id": None, "ack_token": token, "latched_before": before, "latched": after,
            "applied": entry is not None, "cleared": bool(entry and entry.get("cleared_ns")), "ack": entry}
