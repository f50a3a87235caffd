"""The latch file and the acknowledge mailbox: the latched stops kept apart from the SQLite index.

Layout of the latch folder (``[store] latch_dir``, default: the store folder)::

    latch.json          the latch as the action runner holds it, rewritten on every change
    ack-requests.json   the mailbox: acknowledges that ``knitwatch ack`` could not record in the index

``latch.json`` is written by the action runner only: to a temporary file, fsync, rename, fsync of the
folder - a reader sees the old state or the new one, never a mix. Its content is padded with blanks
to whole 4 KiB blocks, so that on a full disk (where no new file can be written) the runner can
still overwrite it in place. A check sum covers the state: a file that does not parse or whose sum
does not match is *corrupt*, and a corrupt or unreadable latch file counts as latched (fail safe).

The mailbox is a fixed-size file (32 KiB of blanks when empty), created by the runner while there is
room; ``knitwatch ack`` appends a request to it in place under an exclusive ``flock`` (no new disk
blocks are needed: this works on a full disk too), the runner takes the requests out, applies them
and reports each one by its token in ``latch.json`` (``acks``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from knitwatch.models.checkpoint import atomic_path

if TYPE_CHECKING:
    from knitwatch.config.settings import StoreConfig

log = structlog.get_logger(__name__)

LATCH_FILE = "latch.json"
MAILBOX_FILE = "ack-requests.json"
VERSION = 1
BLOCK = 4096
LATCH_MIN_BYTES = 2 * BLOCK  # room to grow in place on a full disk
MAILBOX_BYTES = 8 * BLOCK
MAX_REQUESTS = 16  # pending acknowledges in the mailbox
MAX_NOTE = 500
#: the camera of a latched stop whose camera is not known (restored from the PLC's stop output or from
#: an unreadable latch file); only an acknowledge of all cameras releases it
UNKNOWN_CAMERA = "*"


class LatchFileError(Exception):
    """The latch file or the mailbox exists but cannot be read or is corrupt."""


def latch_dir_of(store: StoreConfig) -> Path:
    """The latch folder of a ``[store]`` section."""
    return Path(store.latch_dir) if store.latch_dir is not None else Path(store.path)


def _checksum(state: Any) -> str:  # noqa: ANN401
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode(kind: str, state: dict[str, Any], min_bytes: int) -> bytes:
    """The file's bytes: JSON with a check sum, padded with blanks to whole blocks of at least ``min_bytes``."""
    text = json.dumps({"knitwatch": kind, "version": VERSION, "sha256": _checksum(state), "state": state},
                      indent=1, sort_keys=True).encode()
    size = max(min_bytes, -(-(len(text) + 1) // BLOCK) * BLOCK)
    return text + b" " * (size - len(text) - 1) + b"\n"


def decode(kind: str, data: bytes, name: str) -> dict[str, Any]:
    """The state of a file's bytes; :class:`LatchFileError` (naming ``name``) when it is not whole."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LatchFileError(f"{name} is corrupt (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("knitwatch") != kind or not isinstance(doc.get("state"), dict):
        raise LatchFileError(f"{name} is corrupt (not a knitwatch {kind} file)")
    if doc.get("version") != VERSION:
        raise LatchFileError(f"{name} has version {doc.get('version')!r}, this knitwatch reads {VERSION}")
    if doc.get("sha256") != _checksum(doc["state"]):
        raise LatchFileError(f"{name} is corrupt (its check sum does not match: a torn or edited write)")
    return doc["state"]


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file that replaces ``path`` in one rename (file and folder fsynced)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _overwrite(fd: int, data: bytes) -> None:
    """Overwrite the start of an open file with ``data`` (its blocks exist: no new space is needed)."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)
    os.fsync(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class LatchFile:
    """``latch.json`` in ``folder``: read at start, written by the action runner on every change."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LATCH_FILE
        self._written: tuple[int, int] | None = None  # the file as last written (device, inode)
        self.in_place_writes = 0

    def read(self) -> dict[str, Any] | None:
        """The state, or None when there is no latch file; :class:`LatchFileError` when it is unreadable
        or corrupt (the caller must then treat the stop as latched)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LatchFileError(f"{LATCH_FILE} cannot be read: {e.strerror or e}") from None
        return decode("latch", data, LATCH_FILE)

    def write(self, state: dict[str, Any]) -> str:
        """Write ``state``: atomically (``"atomic"``), or - when no new file can be written (disk full) -
        over the existing file in place (``"in place"``). OSError when neither works."""
        data = encode("latch", state, LATCH_MIN_BYTES)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_new(self.path, data)
            self._written = _identity(self.path.stat())
            return "atomic"
        except OSError as first:
            try:
                fd = os.open(self.path, os.O_WRONLY)
            except OSError:
                raise first from None
            try:
                if os.fstat(fd).st_size < len(data):
                    raise first
                _overwrite(fd, data)
                self._written = _identity(os.fstat(fd))
            finally:
                os.close(fd)
            self.in_place_writes += 1
            return "in place"

    def gone(self) -> bool:
        """True when the file this object wrote last is no longer there (removed, replaced)."""
        if self._written is None:
            return False
        try:
            return _identity(self.path.stat()) != self._written
        except OSError:
            return True


# ---------------------------------------------------------------------- the mailbox


def _empty_mailbox() -> bytes:
    return encode("ack-requests", {"requests": []}, MAILBOX_BYTES)


def _create_mailbox(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_new(folder / MAILBOX_FILE, _empty_mailbox())


def ensure_mailbox(folder: Path | str) -> bool:
    """Create the (empty, full-size) mailbox when it is missing; True when it exists afterwards."""
    if (Path(folder) / MAILBOX_FILE).is_file():
        return True
    try:
        _create_mailbox(Path(folder))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _locked_mailbox(folder: Path) -> Any:  # noqa: ANN401 - yields (fd, requests, corrupt_reason)
    path = folder / MAILBOX_FILE
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        try:
            state = decode("ack-requests", data, MAILBOX_FILE)
            requests = [r for r in state.get("requests", []) if isinstance(r, dict)]
            problem = ""
        except LatchFileError as e:
            requests, problem = [], str(e)
        yield fd, requests, problem
    finally:
        os.close(fd)  # releases the lock


def post_ack_request(folder: Path | str, *, by: str, camera: str | None, note: str,
                     covers_seq: int | None) -> dict[str, Any]:
    """Append an acknowledge request to the mailbox in ``folder`` and return it (with its ``token``).
    ``covers_seq``: the latch's sequence number the requester saw (the request acknowledges what was
    latched up to it; None: everything latched when the daemon applies it). OSError or
    :class:`LatchFileError` when it cannot be recorded."""
    folder = Path(folder)
    if not (folder / MAILBOX_FILE).is_file():
        _create_mailbox(folder)  # OSError says why (read-only, full, ...)
    request = {"token": secrets.token_hex(8), "by": (by or "").strip()[:200] or "unknown", "camera": camera,
               "note": (note or "")[:MAX_NOTE], "requested_ns": time.time_ns(), "covers_seq": covers_seq,
               "pid": os.getpid()}
    with _locked_mailbox(folder) as (fd, requests, problem):
        if problem:
            log.error("the acknowledge mailbox was corrupt: started again", problem=problem)
        if len(requests) >= MAX_REQUESTS:
            raise LatchFileError(f"{MAILBOX_FILE} already holds {len(requests)} acknowledges the daemon has not "
                                 "taken (is it running?)")
        data = encode("ack-requests", {"requests": [*requests, request]}, MAILBOX_BYTES)
        if len(data) > os.fstat(fd).st_size:
            raise LatchFileError(f"{MAILBOX_FILE} is full")
        _overwrite(fd, data)
    return request


def take_ack_requests(folder: Path | str) -> list[dict[str, Any]]:
    """Take the pending requests out of the mailbox (it is left empty, in place). A corrupt mailbox is
    reported (LatchFileError, after it was emptied); a missing one is created when possible."""
    folder = Path(folder)
    if not (folder / MAILBOX_FILE).is_file():
        ensure_mailbox(folder)
        return []
    with _locked_mailbox(folder) as (fd, requests, problem):
        if requests or problem:
            _overwrite(fd, _empty_mailbox())
    if problem:
        raise LatchFileError(problem)
    return requests


# ---------------------------------------------------------------------- readers (API, CLI)



def read_view(folder: Path | str) -> dict[str, Any]:
    """What the latch file says, for the API and the CLI: ``{"ok", "problem", "exists", "stop": [cameras],
    "alarm": [cameras], "events": [{"id", "camera", "action"}], "latch_seq", "acks", "written"}``. A
    corrupt or unreadable file reads as latched (``stop: ["*"]``)."""
    view: dict[str, Any] = {"ok": True, "problem": "", "exists": False, "stop": [], "alarm": [], "events": [],
                            "latch_seq": None, "acks": [], "written": None}
    try:
        state = LatchFile(folder).read()
    except LatchFileError as e:
        return {**view, "ok": False, "exists": True, "problem": str(e), "stop": [UNKNOWN_CAMERA]}
    if state is None:
        return view
    latch = state.get("latch") or {}
    events = []
    for action in ("stop", "alarm"):
        cams = latch.get(action) or {}
        view[action] = sorted(cams)
        for cam, ids in sorted(cams.items()):
            events += [{"id": int(i), "camera": cam, "action": action} for i in sorted(ids, key=int)]
    return {**view, "exists": True, "events": events, "latch_seq": state.get("latch_seq"),
            "acks": state.get("acks") or [], "written": state.get("written")}


def current_latch(view: dict[str, Any], live: dict[str, Any] | None = None,
                  index: dict[str, list[str]] | None = None, index_events: list[dict[str, Any]] | None = None,
                  ) -> dict[str, Any]:
    """The latch to show (API, page, CLI): ``{"stop", "alarm", "latched", "events", "source"}`` from the
    latch file (``view``: :func:`read_view`; rewritten on every change, so the freshest) while it is
    whole and being written; else the running action runner's (``live``: its stats); else the index's
    (``index``: ``Store.latched()``, ``index_events``: ``Store.latched_events()``). An unreadable latch
    file shows a stop of unknown origin (``*``), as the runner treats it."""
    written = live is None or bool((live.get("latch_file") or {"ok": True}).get("ok", True))
    if view.get("exists") and view.get("ok") and written:
        stop, alarm, events, source = view["stop"], view["alarm"], view["events"], "latch file"
    elif live and isinstance(live.get("latched_events"), dict):
        le = live["latched_events"]
        events = [{"id": int(i), "camera": cam, "action": a} for a in ("stop", "alarm")
                  for cam, ids in sorted((le.get(a) or {}).items()) for i in ids]
        stop, alarm, source = sorted(le.get("stop") or {}), sorted(le.get("alarm") or {}), "daemon"
    elif view.get("exists"):  # unreadable: latched, plus whatever the index holds
        idx = index or {"stop": [], "alarm": []}
        stop, alarm = sorted({UNKNOWN_CAMERA, *idx["stop"]}), sorted(idx["alarm"])
        events = [{"id": 0, "camera": UNKNOWN_CAMERA, "action": "stop"}, *(index_events or [])]
        source = "latch file (unreadable)"
    elif index is not None:
        stop, alarm, events, source = index["stop"], index["alarm"], list(index_events or []), "index"
    else:
        stop, alarm, events, source = [], [], [], "none"
    return {"stop": list(stop), "alarm": list(alarm), "latched": bool(stop or alarm), "events": events,
            "source": source}
