"""The model library as people see it: articles, versions with their validation figures, and which
model each configured camera uses. Shared by ``knitwatch model list`` and ``GET /api/models``.

The figures come from a version's ``meta.json`` (written by ``knitwatch learn train``): the estimated
false stops per hour on the held-back frames (``validation``) and, when measured, the recall on the simulator's
scheduled defects (``recall_on_simulator``); then the top level, so a version added by other means lists too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knitwatch.models.articles import Library, LibraryError, ModelVersion

FALSE_STOPS_KEYS = ("false_stops_per_hour", "est_false_stops_per_hour", "estimated_false_stops_per_hour")
RECALL_KEYS = ("recall", "defect_recall")


def _figure(meta: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for where in (meta.get("validation"), meta.get("recall_on_simulator"), meta):
        if not isinstance(where, dict):
            continue
        for k in keys:
            v = where.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                return float(v)
    return None


def version_info(m: ModelVersion, used_by: list[str]) -> dict[str, Any]:
    """One version: id, created, kind, validation figures, the cameras that use it now."""
    meta = m.meta
    validation = meta.get("validation") if isinstance(meta.get("validation"), dict) else {}
    return {"article": m.article, "version": m.version, "id": m.id, "created": meta.get("created"),
            "kind": meta.get("kind"), "false_stops_per_hour": _figure(meta, FALSE_STOPS_KEYS),
            "recall": _figure(meta, RECALL_KEYS), "validation": validation, "used_by": used_by}


def describe(library: Library, cameras: list[str], configured: Path | str | None) -> dict[str, Any]:
    """The library and the selection: ``{"library", "cameras": {cam: ...}, "articles": [...], "problems"}``.

    ``cameras``: the configured camera ids (each listed, selected or not); ``configured``: the daemon's
    configured checkpoint (what a camera without a selection runs). A version whose meta.json cannot be
    read is left out and named in ``problems``; an unreadable selection is a :class:`LibraryError`."""
    selection = library.selection()["cameras"]
    cams: dict[str, Any] = {}
    in_use: dict[str, list[str]] = {}
    for cam in cameras:
        entry = selection.get(cam) or {}
        model = entry.get("model") if isinstance(entry.get("model"), dict) else None
        history = [h.get("id") for h in entry.get("history") or [] if isinstance(h, dict)]
        if model:
            cams[cam] = {"model": model.get("id"), "article": model.get("article"), "version": model.get("version"),
                         "kind": model.get("kind"), "since": entry.get("since"), "by": entry.get("by") or "",
                         "history": history, "configured": False}
            in_use.setdefault(str(model.get("id")), []).append(cam)
        else:
            cams[cam] = {"model": None, "article": None, "version": None, "kind": None, "since": None, "by": "",
                         "history": history, "configured": True}
        cams[cam]["checkpoint"] = Path(configured).name if configured else None
    articles, problems = [], []
    for article in library.articles():
        try:
            versions = library.versions(article)
        except LibraryError as e:
            problems.append(str(e))
            continue
        articles.append({"article": article,
                         "versions": [version_info(m, in_use.get(m.id, [])) for m in versions]})
    return {"library": str(library.root), "cameras": cams, "articles": articles, "problems": problems}
