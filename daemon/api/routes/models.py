"""``/api/models`` and ``/api/learn``: the model library, each camera's model, and learning a new fabric.

``POST /api/models/use`` and ``/rollback`` write the library's selection as ``knitwatch model use|rollback``
do; the running daemon's stages switch the camera at a frame boundary by themselves. ``POST /api/learn``
starts a learn job (record, then train, validate and install: :mod:`knitwatch.daemon.api.learnjobs`).
The POSTs and the DELETE follow the same token and origin rules as the acknowledge (the router's
:func:`require_token` and the app's gate). Answers never echo a name that is not allowed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from knitwatch.daemon.api.deps import DaemonView, get_cameras, get_view
from knitwatch.daemon.api.learnjobs import JobConflict, LearnJobs, LearnRequest
from knitwatch.daemon.api.security import require_token
from knitwatch.daemon.library import describe
from knitwatch.models.articles import Library, LibraryError, check_article, parse_spec
from knitwatch.models.registry import trainable_kinds

log = structlog.get_logger(__name__)

router = APIRouter(dependencies=[Depends(require_token)])

SWITCH_NOTE = "the daemon switches the camera to it by itself at a frame boundary (no restart)"
ARTICLE_RULE = ("1-64 characters, letters, digits, '.', '_' and '-', starting with a letter or digit (no path "
                "characters such as '/' or '..')")


class UseBody(BaseModel):
    camera: str = Field(..., min_length=1, max_length=64)
    model: str = Field(..., min_length=1, max_length=80, description="ARTICLE or ARTICLE@VERSION")
    by: str = Field("web", max_length=200)


class RollbackBody(BaseModel):
    camera: str = Field(..., min_length=1, max_length=64)
    by: str = Field("web", max_length=200)


class LearnBody(BaseModel):
    camera: str = Field(..., min_length=1, max_length=64)
    article: str = Field(..., min_length=1, max_length=64)
    frames: int | None = Field(None, ge=1, le=1_000_000)
    minutes: float | None = Field(None, gt=0, le=24 * 60)
    model: str | None = Field(None, max_length=64, description="model kind (default: [learn] model)")
    steps: int | None = Field(None, ge=1, le=10_000_000)
    use: bool = Field(False, description="select the new model for the camera once it is installed")
    by: str = Field("web", max_length=200)

    @model_validator(mode="after")
    def _one_size(self) -> LearnBody:
        if self.frames is not None and self.minutes is not None:
            raise ValueError("give frames or minutes, not both")
        return self


def _library(request: Request) -> Library:
    return request.app.state.library


def _jobs(request: Request) -> LearnJobs:
    return request.app.state.learn


def _camera(camera: str, cameras: list[str]) -> str:
    if camera not in cameras:
        raise HTTPException(404, f"no such camera in the daemon's configuration (cameras: {', '.join(cameras)})")
    return camera


def _library_error(e: LibraryError) -> HTTPException:
    log.warning("model library request refused", error=str(e))
    return HTTPException(400, str(e))


@router.get("/api/models")
def list_models(request: Request, cameras: list[str] = Depends(get_cameras),
                view: DaemonView = Depends(get_view)) -> dict[str, Any]:
    """The library and each camera's model: ``model`` the selected one (None: the configured checkpoint),
    ``running`` the one the daemon's frames go to now (its tiler's; None when the daemon does not say),
    ``switching`` while they differ."""
    try:
        info = describe(_library(request), cameras, request.app.state.configured_checkpoint)
    except LibraryError as e:
        raise HTTPException(503, str(e)) from None
    info["library"] = _library(request).root.name
    live = (view.stats_snapshot() or {}).get("cameras") or {}
    for cam, c in info["cameras"].items():
        running = (live.get(cam) or {}).get("model")
        c["running"] = running if isinstance(running, str) else None
        c["switching"] = bool(c["model"] and c["running"] and c["running"] != c["model"])
    return info


@router.post("/api/models/use")
async def use_model(request: Request, body: UseBody, cameras: list[str] = Depends(get_cameras)) -> dict[str, Any]:
    camera = _camera(body.camera, cameras)
    try:
        parse_spec(body.model)
    except LibraryError:
        raise HTTPException(400, f"model: not ARTICLE or ARTICLE@VERSION (article names: {ARTICLE_RULE}; "
                                 "version: a number >= 1)") from None
    try:
        m = await asyncio.to_thread(_library(request).use, camera, body.model, who=body.by)
    except LibraryError as e:
        raise _library_error(e) from None
    except OSError as e:
        log.error("cannot write the model selection", error=str(e))
        raise HTTPException(503, "cannot write the model selection (see the daemon's log)") from None
    log.info("model selected over the API", camera=camera, model=m.id, by=body.by)
    return {"camera": camera, "model": m.id, "kind": m.meta.get("kind"), "note": SWITCH_NOTE}


@router.post("/api/models/rollback")
async def rollback(request: Request, body: RollbackBody, cameras: list[str] = Depends(get_cameras)) -> dict[str, Any]:
    camera = _camera(body.camera, cameras)
    try:
        previous = await asyncio.to_thread(_library(request).rollback, camera, who=body.by)
    except LibraryError as e:
        raise HTTPException(409, str(e)) from None
    except OSError as e:
        log.error("cannot write the model selection", error=str(e))
        raise HTTPException(503, "cannot write the model selection (see the daemon's log)") from None
    log.info("model rolled back over the API", camera=camera, model=previous.get("id"), by=body.by)
    return {"camera": camera, "model": previous.get("id"), "configured": not previous, "note": SWITCH_NOTE}


@router.get("/api/learn")
def learn_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": _jobs(request).list()}


@router.post("/api/learn", status_code=202)
async def learn(request: Request, body: LearnBody, cameras: list[str] = Depends(get_cameras)) -> dict[str, Any]:
    camera = _camera(body.camera, cameras)
    try:
        check_article(body.article)
    except LibraryError:
        raise HTTPException(400, f"article: the name is not allowed: {ARTICLE_RULE}") from None
    kinds = ["auto", *trainable_kinds()]
    if body.model is not None and body.model not in kinds:
        raise HTTPException(400, f"model: not a model kind that can be trained ({', '.join(kinds)})")
    req = LearnRequest(camera=camera, article=body.article, frames=body.frames, minutes=body.minutes,
                       model=body.model, steps=body.steps, use=body.use, by=body.by)
    try:
        job = await asyncio.to_thread(_jobs(request).start, req)
    except JobConflict as e:
        raise HTTPException(409, str(e)) from None
    except OSError as e:
        log.error("cannot start a learn job", camera=camera, error=str(e))
        raise HTTPException(503, "cannot start the learn job: its folder in the model library cannot be written "
                                 "(see the daemon's log)") from None
    return job.to_dict()


@router.delete("/api/learn/{camera}")
async def cancel_learn(request: Request, camera: str, cameras: list[str] = Depends(get_cameras)) -> dict[str, Any]:
    camera = _camera(camera, cameras)
    job = await asyncio.to_thread(_jobs(request).cancel, camera, 30.0)
    if job is None:
        raise HTTPException(404, "this camera has no learn job running")
    return job.to_dict()
