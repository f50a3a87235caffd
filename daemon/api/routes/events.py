"""``/api/events``: the stored defect events, their pictures, and the keep / false-positive marks."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse

from knitwatch.daemon.api.deps import StoreHandle, get_stores
from knitwatch.daemon.api.schemas import FalsePositiveBody, KeepBody
from knitwatch.daemon.api.security import require_token
from knitwatch.pipeline.store.database import FILE_KINDS, MAX_PAGE, parse_event_id
from knitwatch.pipeline.store.queries import parse_time

log = structlog.get_logger(__name__)

MEDIA_TYPES = {"frame": "image/png", "overlay": "image/jpeg", "mask": "image/png", "thumb": "image/jpeg"}

router = APIRouter(dependencies=[Depends(require_token)])


def event_summary(e: dict[str, Any]) -> dict[str, Any]:
    """An event as the API returns it: with the URLs of its pictures."""
    eid = e["id"]
    e["urls"] = {k: f"/api/events/{eid}/{k}" for k, ok in e.get("files", {}).items() if ok}
    return e


def event_id(event_id: str) -> int:
    try:
        return parse_event_id(event_id)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def time_arg(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return parse_time(value)
    except ValueError as e:  # unreadable or out of range: a 422 naming the parameter
        raise HTTPException(422, f"{name}: {e}") from None


@router.get("/api/events")
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
    stores: StoreHandle = Depends(get_stores),
) -> dict[str, Any]:
    store = stores.get()
    res = store.list_events(camera=camera, since_ns=time_arg(since, "since"),
                            until_ns=time_arg(until, "until"), severity=severity, action=action,
                            acknowledged=acknowledged, keep=keep, false_positive=false_positive, limit=limit,
                            offset=offset)
    res["items"] = [event_summary(e) for e in res["items"]]
    nxt = res["offset"] + len(res["items"])
    res["next_offset"] = nxt if nxt < res["total"] else None
    return res


@router.get("/api/events/{event_id}")
def get_event(eid: int = Depends(event_id), stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    e = stores.get().get_event(eid)
    if e is None:
        raise HTTPException(404, f"no event {eid}")
    return event_summary(e)


@router.get("/api/events/{event_id}/{kind}")
def event_file(kind: str, eid: int = Depends(event_id), stores: StoreHandle = Depends(get_stores)) -> FileResponse:
    if kind not in FILE_KINDS:
        raise HTTPException(400, f"file kind must be one of {', '.join(FILE_KINDS)}")
    store = stores.get()
    path = store.file_path(eid, kind)
    if path is None:
        raise HTTPException(404, f"event {eid} has no {kind} picture")
    return FileResponse(path, media_type=MEDIA_TYPES[kind],
                        headers={"Cache-Control": "private, max-age=3600"},
                        filename=f"knitwatch-event-{eid}-{path.name}", content_disposition_type="inline")


@router.post("/api/events/{event_id}/keep")
def keep_event(body: KeepBody | None = None, eid: int = Depends(event_id),
               stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    body = body or KeepBody()
    if not stores.get().set_keep(eid, body.keep):
        raise HTTPException(404, f"no event {eid}")
    log.info("event keep set over the API", event_id=eid, keep=body.keep)
    return {"id": eid, "keep": body.keep}


@router.post("/api/events/{event_id}/false-positive")
def false_positive(body: FalsePositiveBody | None = None, eid: int = Depends(event_id),
                   stores: StoreHandle = Depends(get_stores)) -> dict[str, Any]:
    body = body or FalsePositiveBody()
    if not stores.get().mark_false_positive(eid, body.value, by=body.by, note=body.note):
        raise HTTPException(404, f"no event {eid}")
    log.info("event marked over the API", event_id=eid, false_positive=body.value, by=body.by)
    return {"id": eid, "false_positive": body.value}
