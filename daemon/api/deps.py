"""What the routes share, kept on ``app.state`` by :func:`knitwatch.daemon.api.app.create_app` and
handed to them as FastAPI dependencies: the daemon view, the store handle, the configured cameras."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from fastapi import HTTPException, Request

from knitwatch.config.settings import StoreConfig
from knitwatch.pipeline.store.database import Store, StoreError


class DaemonView(Protocol):
    """What the API reads from the daemon (the supervisor implements it)."""

    def stats_snapshot(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


class StaticView:
    """A fixed stats snapshot and health: for serving a store without a running daemon (and tests)."""

    def __init__(self, snapshot: dict[str, Any] | None = None, healthy: bool = False,
                 degraded: list[str] | None = None) -> None:
        self.snapshot = snapshot or {}
        self.healthy = healthy
        self.degraded = list(degraded or [])  # why it is degraded (the supervisor's "degraded")

    def stats_snapshot(self) -> dict[str, Any]:
        return self.snapshot

    def health(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "ready": bool(self.snapshot.get("ready", self.healthy)), "stages": {},
                "degraded": self.degraded}


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
                    self._store = Store.from_config(StoreConfig(path=self.path, fsync=self.fsync), create=False)
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


def get_view(request: Request) -> DaemonView:
    return request.app.state.view


def get_stores(request: Request) -> StoreHandle:
    return request.app.state.stores


def get_cameras(request: Request) -> list[str]:
    """The configured camera ids."""
    return request.app.state.cameras
