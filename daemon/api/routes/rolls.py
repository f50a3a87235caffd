"""``/api/rolls``: the rolls, the roll report (defects, places, counts, points, grade) and a new roll.

A new roll goes into the store as an acknowledge does (the same token and origin rules: the router's
:func:`require_token` and the app's gate); the alert stage takes it within about half a second
(``?wait=S`` waits for that)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from knitwatch.daemon.api.deps import StoreHandle, get_stores
from knitwatch.daemon.api.security import require_token
from knitwatch.pipeline.decision.grading import report_csv, roll_report
from knitwatch.pipeline.store.database import StoreError
from knitwatch.pipeline.store.rolls import parse_roll_id

log = structlog.get_logger(__name__)

router = APIRouter(dependencies=[Depends(require_token)])


class RollBody(BaseModel):
    by: str = Field("web", max_length=200)
    note: str = Field("", max_length=2000)


def _roll(store: Any, roll: str) -> dict[str, Any]:  # noqa: ANN401 - a Store
    if roll == "current":
        found = store.current_roll()
        if found is None:
            raise HTTPException(404, "there is no roll yet")
        return found
    try:
        rid = parse_roll_id(roll)
    except ValueError as e:
        raise HTTPException(400, f"{e} (or 'current')") from None
    found = store.get_roll(rid)
    if found is None:
        raise HTTPException(404, f"no roll {rid}")
    return found


def _with_urls(rep: dict[str, Any]) -> dict[str, Any]:
    for d in rep["defects"]:
        d["urls"] = {k: f"/api/events/{d['event_id']}/{k}" for k in d["pictures"]}
    return rep


@router.get("/api/rolls")
def list_rolls(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
               stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    res = stores.get().list_rolls(limit=limit, offset=offset)
    for r in res["items"]:
        r["report_url"] = f"/api/rolls/{r['id']}/report"
    return res


@router.get("/api/rolls/{roll}/report", response_model=None)
def report(request: Request, roll: str,
           format: str = Query("json", pattern="^(json|csv)$", description="json or csv"),  # noqa: A002
           length_m: float | None = Query(None, gt=0, lt=1e6, description="the roll's length, when not known"),
           stores: StoreHandle = Depends(get_stores)) -> dict[str, Any] | PlainTextResponse:
    store = stores.get()
    found = _roll(store, roll)
    rep = roll_report(found, store.roll_events(found["id"]), request.app.state.roll_settings, length_m=length_m)
    if format == "csv":
        return PlainTextResponse(report_csv(rep), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="roll-{found["id"]}.csv"'})
    return _with_urls(rep)


@router.post("/api/rolls")
async def new_roll(request: Request, body: RollBody | None = None,
                   wait: float = Query(0.0, ge=0, le=30, description="seconds to wait until the daemon takes it"),
                   stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    body = body or RollBody()
    store = stores.get()
    try:
        rid = await asyncio.to_thread(store.new_roll, "api", body.by or "web", note=body.note,
                                      machine=request.app.state.roll_settings.machine or None,
                                      cameras=list(request.app.state.cameras))
    except (StoreError, sqlite3.Error) as e:
        log.error("cannot start a roll: the store's index cannot take it", error=str(e))
        raise HTTPException(503, "cannot start a roll: the store's index is unusable (see the daemon's log)") from None
    log.info("new roll requested over the API", roll_id=rid, by=body.by, note=body.note)
    deadline = time.monotonic() + wait
    roll = await asyncio.to_thread(store.get_roll, rid)
    while wait and time.monotonic() < deadline and roll is not None and roll["handled"] is None:
        await asyncio.sleep(0.1)
        roll = await asyncio.to_thread(store.get_roll, rid)
    return {"roll_id": rid, "taken": bool(roll and roll["handled"]), "roll": roll}
