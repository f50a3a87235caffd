"""The model library: trained models kept per article (the fabric a machine knits), with versions,
and which model each camera uses (the selection).

Layout under the library folder (``[learn] library_dir``, default ``<store.path>/models``)::

    <article>/v<N>/model.ckpt      the checkpoint ('knitwatch train' format)
    <article>/v<N>/meta.json       what the stages need (kind, id, preprocess, thresholds) and the record:
                                   when, from which frames, validation figures, training settings
    active.json                    the selection: per camera the model in use and its history (rollback)

A version appears whole or not at all: it is written into a hidden temporary folder of the library
and renamed into place (the rename is atomic on one file system), so a full disk or a killed process
leaves no half-written version (only a ``.tmp-*`` folder that the next ``add`` removes). The selection
is replaced atomically too (write, fsync, rename); the daemon's stages poll its modification time and
switch the camera's model at a frame boundary (``knitwatch.pipeline.modelswitch``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARTICLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SELECTION_FILE = "active.json"
CHECKPOINT_FILE = "model.ckpt"
META_FILE = "meta.json"
HISTORY_MAX = 20


class LibraryError(ValueError):
    """A bad article name or version, a missing model, an unreadable library file: the message names it."""


def check_article(name: str) -> str:
    """``name`` if it can be an article (a folder name of its own), else :class:`LibraryError`."""
    if not isinstance(name, str) or not ARTICLE.match(name) or name in (".", ".."):
        raise LibraryError(
            f"article name {name!r} is not allowed: 1-64 characters, letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no path characters such as '/' or '..')")
    return name


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``ARTICLE`` or ``ARTICLE@VERSION`` (``@3`` or ``@v3``) -> (article, version or None for the newest)."""
    article, sep, version = spec.partition("@")
    check_article(article)
    if not sep:
        return article, None
    v = version[1:] if version[:1] in ("v", "V") else version
    if not v.isdigit() or int(v) < 1:
        raise LibraryError(f"model {spec!r}: the version after '@' must be a number >= 1 (e.g. {article}@2)")
    return article, int(v)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json_atomic(path: Path, data: Any) -> None:  # noqa: ANN401 - any JSON value
    """Write ``data`` as JSON to ``path`` whole or not at all (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ModelVersion:
    article: str
    version: int
    folder: Path
    meta: dict

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def id(self) -> str:
        """The model's identity in messages, events and decisions: ``ARTICLE@vN``."""
        return f"{self.article}@v{self.version}"

    def summary(self) -> dict[str, Any]:
        """What the stages need to run it: the shape of ``checkpoint_summary`` plus article and version."""
        return {"path": str(self.checkpoint), "id": self.id, "kind": self.meta.get("kind"),
                "preprocess": self.meta["preprocess"], "thresholds": self.meta["thresholds"],
                "article": self.article, "version": self.version}

    def to_dict(self) -> dict[str, Any]:
        return {"article": self.article, "version": self.version, "id": self.id, "path": str(self.checkpoint),
                **{k: v for k, v in self.meta.items() if k not in ("preprocess",)}}


class Library:
    """The model library in ``root`` (created on first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ versions
    def articles(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and ARTICLE.match(p.name)
                      and self.versions(p.name))

    def versions(self, article: str) -> list[ModelVersion]:
        check_article(article)
        folder = self.root / article
        if not folder.is_dir():
            return []
        out = []
        for p in folder.iterdir():
            if p.is_dir() and re.fullmatch(r"v[1-9][0-9]*", p.name) and (p / META_FILE).is_file():
                out.append(self._read(article, int(p.name[1:]), p))
        return sorted(out, key=lambda m: m.version)

    def _read(self, article: str, version: int, folder: Path) -> ModelVersion:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LibraryError(f"model {article}@v{version}: cannot read {folder / META_FILE}: {e}") from None
        if not isinstance(meta, dict) or "preprocess" not in meta or "thresholds" not in meta:
            raise LibraryError(f"model {article}@v{version}: {folder / META_FILE} lacks preprocess/thresholds")
        return ModelVersion(article, version, folder, meta)

    def get(self, spec: str) -> ModelVersion:
        """``ARTICLE`` (its newest version) or ``ARTICLE@N``; :class:`LibraryError` naming what exists."""
        article, version = parse_spec(spec)
        found = self.versions(article)
        if not found:
            known = ", ".join(self.articles()) or "none"
            raise LibraryError(f"no model for article {article!r} in {self.root} (articles: {known})")
        if version is None:
            return found[-1]
        for m in found:
            if m.version == version:
                return m
        raise LibraryError(f"article {article!r} has no version {version} (versions: "
                           f"{', '.join(str(m.version) for m in found)})")

    def add(self, article: str, checkpoint: Path, meta: dict[str, Any]) -> ModelVersion:
        """Install ``checkpoint`` (copied) as the article's next version with ``meta`` (must hold ``kind``,
        ``preprocess`` and ``thresholds``); ``created`` is added. Whole or nothing."""
        check_article(article)
        missing = [k for k in ("kind", "preprocess", "thresholds") if k not in meta]
        if missing:
            raise LibraryError(f"model metadata lacks {', '.join(missing)}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            shutil.copyfile(checkpoint, tmp / CHECKPOINT_FILE)
            with open(tmp / CHECKPOINT_FILE, "rb") as f:
                os.fsync(f.fileno())
            (self.root / article).mkdir(exist_ok=True)
            while True:
                existing = [m.version for m in self.versions(article)]
                others = [int(p.name[1:]) for p in (self.root / article).iterdir()
                          if re.fullmatch(r"v[1-9][0-9]*", p.name)]
                version = max(existing + others, default=0) + 1
                full = {**meta, "article": article, "version": version, "created": meta.get("created", now_iso())}
                write_json_atomic(tmp / META_FILE, full)
                try:
                    os.rename(tmp, self.root / article / f"v{version}")  # fails if another add took it
                    break
                except OSError:
                    if (self.root / article / f"v{version}").exists():
                        continue
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if (self.root / article).is_dir() and not any((self.root / article).iterdir()):
                (self.root / article).rmdir()
            raise
        return self._read(article, version, self.root / article / f"v{version}")

    def _clean_temporaries(self) -> None:
        for p in self.root.glob(".tmp-*"):
            if p.is_dir() and time.time() - p.stat().st_mtime > 60:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ selection
    @property
    def selection_path(self) -> Path:
        return self.root / SELECTION_FILE

    def selection(self) -> dict[str, Any]:
        """``{"cameras": {cam: {"model": summary, "since": iso, "history": [summary, ...]}}}``."""
        return read_selection(self.selection_path)

    def use(self, camera: str, spec: str, *, who: str = "") -> ModelVersion:
        """Select ``spec`` for ``camera`` (the daemon switches at a frame boundary); the previous choice
        goes onto the camera's history."""
        m = self.get(spec)
        self._select(camera, m.summary(), who=who)
        return m

    def rollback(self, camera: str, *, who: str = "") -> dict[str, Any]:
        """Go back to the camera's previous model (the one it used before the current); from the first model
        selected, back to the daemon's configured checkpoint (the camera's selection is removed: returns {})."""
        sel = self.selection()
        entry = sel["cameras"].get(camera)
        if not entry or not entry.get("model"):
            raise LibraryError(f"camera {camera!r} uses the configured checkpoint: there is no earlier model to roll "
                               "back to")
        if not entry.get("history"):
            del sel["cameras"][camera]
            write_json_atomic(self.selection_path, sel)
            return {}
        previous = entry["history"][-1]
        entry["history"] = entry["history"][:-1]
        entry.update(model=previous, since=now_iso(), by=who)
        sel["cameras"][camera] = entry
        write_json_atomic(self.selection_path, sel)
        return dict(previous)

    def _select(self, camera: str, summary: dict[str, Any], *, who: str) -> None:
        sel = self.selection()
        entry = sel["cameras"].get(camera) or {"history": []}
        current = entry.get("model")
        history = list(entry.get("history") or [])
        if current and current.get("id") != summary["id"]:
            history = (history + [current])[-HISTORY_MAX:]
        sel["cameras"][camera] = {"model": summary, "since": now_iso(), "by": who, "history": history}
        write_json_atomic(self.selection_path, sel)


def read_selection(path: Path) -> dict[str, Any]:
    """The selection file, or an empty selection when it does not exist; a broken one is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"cameras": {}}
    except OSError as e:
        raise LibraryError(f"cannot read the model selection {path}: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LibraryError(f"the model selection {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cameras", {}), dict):
        raise LibraryError(f"the model selection {path} has no 'cameras' object")
    data.setdefault("cameras", {})
    return data


def library_dir(settings: Any) -> Path:  # noqa: ANN401 - knitwatch.config.Settings
    """The library folder of these settings: ``[learn] library_dir`` or ``<store.path>/models``."""
    d = settings.learn.library_dir
    return Path(d) if d is not None else Path(settings.store.path) / "models"
