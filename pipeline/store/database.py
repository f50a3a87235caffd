"""The defect store: an SQLite index (WAL mode) plus one folder of image files per event.

Layout under the store's root (``[store] path``)::

    events.sqlite3                      the index: events, acknowledges (WAL: -wal/-shm beside it)
    events/<YYYY-MM-DD>/<id:08d>/       one folder per event (UTC date of the frame)
        frame.png    the original frame, lossless
        overlay.jpg  heat map blended, region contours and boxes, score labels
        mask.png     the binary region mask (0/255) at frame size
        thumb.jpg    a small overlay for galleries
        event.json   the event's JSON record (the same as the index's ``record`` column)

Crash safety. An event's row is committed (state ``writing``) before its actions run and before its
files are written; each file is written to a temporary name and renamed into place, so a file is
either whole or absent; the row turns ``complete`` when all files are in place. :meth:`Store.recover`
(at the alert stage's start) deletes temporary leftovers and the folders of rows this index deleted,
and flags rows whose files are missing as ``files_missing`` (the event itself - and its stop - stays
true). Folders a lost index made (removed, corrupt, replaced) are kept, never deleted as orphans, and
new ids start above them.

An index that cannot be used (corrupt, read-only, full disk, removed or replaced while open) makes the
store *unusable* or *degraded* (:attr:`Store.problem`), never silently wrong: every query checks that
the index file is the one opened, and the index is opened again every :data:`REOPEN_EVERY_S`. The
latched stops do not depend on it: the action runner keeps them in its own latch file
(:mod:`knitwatch.pipeline.actions.latch`) and holds events in memory until the store takes them.

Retention (:meth:`Store.enforce_retention`): events older than ``retention_days`` and, while the
total size exceeds ``max_gb``, the oldest events are deleted - never events marked *keep*, and never
stop/alarm events still waiting for their acknowledge.

Acknowledges (:meth:`Store.request_ack`) are rows in ``acks`` written by whoever acknowledges (the
``knitwatch ack`` command, the HTTP API); the alert stage polls them, resets the latch, clears the
stop output and records the handling in the same row. Acknowledges applied while the index was
unusable (through the latch folder's mailbox) are recorded later (:meth:`Store.record_ack`).
Several processes may open the store at once.
Every path handed out is resolved from the index and checked to lie inside the store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog

from knitwatch.pipeline.store.rolls import RollsMixin, migrate_rolls, roll_of_new_event

if TYPE_CHECKING:
    from knitwatch.config.settings import StoreConfig

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2  # 2: rolls (events.roll_id)
DB_NAME = "events.sqlite3"
EVENTS_DIR = "events"
RECORD_FILE = "event.json"
#: file kinds of an event and their names in its folder
FILE_KINDS: dict[str, str] = {"frame": "frame.png", "overlay": "overlay.jpg", "mask": "mask.png", "thumb": "thumb.jpg"}
_ENCODE: dict[str, tuple[str, list[int]]] = {
    "frame": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    "mask": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]),
    "overlay": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "thumb": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 85]),
}
_TMP_RE = re.compile(r"^\..+\.tmp$")
_DIR_RE = re.compile(r"^\d{4}-\d{2}-\d{2}/\d{8,}$")
LATCHING_ACTIONS = ("stop", "alarm")
MAX_PAGE = 500
REOPEN_EVERY_S = 2.0  # an unusable index is opened again at most this often

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    camera TEXT NOT NULL,
    t_wall_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    severity TEXT NOT NULL,
    action TEXT NOT NULL,
    image_score REAL NOT NULL,
    max_area_px INTEGER NOT NULL,
    state TEXT NOT NULL,
    dir TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    keep INTEGER NOT NULL DEFAULT 0,
    false_positive INTEGER NOT NULL DEFAULT 0,
    fp_by TEXT, fp_note TEXT, fp_ns INTEGER,
    action_state TEXT NOT NULL,
    ack_id INTEGER, acked_ns INTEGER,
    created_ns INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (t_wall_ns);
CREATE INDEX IF NOT EXISTS events_camera_time ON events (camera, t_wall_ns);
CREATE INDEX IF NOT EXISTS events_unacked ON events (acked_ns, action);
CREATE TABLE IF NOT EXISTS acks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_ns INTEGER NOT NULL,
    ack_by TEXT NOT NULL,
    camera TEXT,
    note TEXT NOT NULL DEFAULT '',
    max_event_id INTEGER NOT NULL,
    handled_ns INTEGER,
    handled_pid INTEGER,
    events_acked INTEGER,
    cleared_ns INTEGER,
    result TEXT
);
CREATE INDEX IF NOT EXISTS acks_pending ON acks (handled_ns);
CREATE TABLE IF NOT EXISTS rolls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_ns INTEGER NOT NULL,
    ended_ns INTEGER,
    reason TEXT NOT NULL,
    started_by TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    machine TEXT NOT NULL DEFAULT '',
    cameras TEXT,
    handled_ns INTEGER,
    start_pos TEXT,
    end_pos TEXT
);
"""

_EVENT_COLS = ("id, camera, t_wall_ns, seq, severity, action, image_score, max_area_px, state, dir, bytes, keep, "
               "false_positive, fp_by, fp_note, fp_ns, action_state, ack_id, acked_ns, created_ns")


class StoreError(Exception):
    """The store cannot do what was asked (database or file system trouble, no store there)."""


def parse_event_id(value: object) -> int:
    """A valid event id from user input (int or decimal string); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("event id must be a positive integer")
    if isinstance(value, int):
        eid = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        eid = int(value)
    else:
        raise ValueError("event id must be a positive integer")
    if not 0 < eid < 2**63:
        raise ValueError("event id must be a positive integer")
    return eid


def iso_utc(t_ns: int | None) -> str | None:
    if t_ns is None:
        return None
    return dt.datetime.fromtimestamp(t_ns / 1e9, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rowid(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added."""
    if cur.lastrowid is None:  # never after an INSERT; int(None) raised this before
        raise TypeError("the INSERT returned no row id")
    return cur.lastrowid


def _no_paths(text: str, root: Path) -> str:
    """``text`` without the store's absolute path (reasons are shown by ``/healthz``)."""
    return text.replace(f"{root}/", "").replace(str(root), "the store folder")


def _event_folders(events_dir: Path) -> list[tuple[str, int]]:
    """``(day/id, id)`` of the event folders under ``events_dir`` (names of 8+ digits)."""
    out = []
    with contextlib.suppress(OSError):
        for day in events_dir.iterdir():
            if not day.is_dir():
                continue
            with contextlib.suppress(OSError):
                out += [(f"{day.name}/{f.name}", int(f.name)) for f in day.iterdir()
                        if _DIR_RE.match(f"{day.name}/{f.name}")]
    return out


def encode_image(kind: str, img: np.ndarray) -> bytes:
    ext, params = _ENCODE[kind]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise ValueError(f"cannot encode {kind} image of shape {img.shape}")
    return buf.tobytes()


class Store(RollsMixin):
    """One store root. Thread-safe (one connection behind a lock); several processes may share it.

    Every query first checks that the index file is still the one opened (a removed or replaced file
    would otherwise take writes silently); when it is not, or when the index could not be opened,
    the store is *unusable*: calls raise :class:`StoreError` and the index is opened again at most
    every :data:`REOPEN_EVERY_S` seconds. :attr:`problem` says why the store is degraded ("" when it
    works), without absolute paths (it is shown by ``/healthz``)."""

    def __init__(self, root: Path | str, *, retention_days: float, max_gb: float, fsync: bool, create: bool = True,
                 busy_timeout_s: float = 5.0, degraded_ok: bool = False) -> None:
        """``degraded_ok``: an index that cannot be opened (corrupt, read-only, no space, no folder) does
        not raise: the store starts unusable (:attr:`problem` says why) and is opened again later."""
        self.root = Path(root)
        self.create = create
        self.busy_timeout_s = busy_timeout_s
        self.events_dir = self.root / EVENTS_DIR
        self.db_path = self.root / DB_NAME
        self.retention_s = float(retention_days) * 86400.0
        self.max_bytes = int(float(max_gb) * 1e9)
        self.fsync = fsync
        self.errors: Counter[str] = Counter()
        self.last_error = ""
        self.problem = ""
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._next_reopen = 0.0
        self._closed = False
        self.id_floor = 0  # new event ids stay above this (ids of a lost index that the latch still holds)
        try:
            self._open()
        except StoreError as e:
            if not degraded_ok:
                raise
            self._unusable(f"{e}", kind="open")

    @classmethod
    def from_config(cls, config: StoreConfig, *, create: bool = True, degraded_ok: bool = False) -> Store:
        """The store of a ``[store]`` section: its path, retention and fsync settings."""
        return cls(config.path, retention_days=config.retention_days, max_gb=config.max_gb, fsync=config.fsync,
                   create=create, degraded_ok=degraded_ok)

    # ------------------------------------------------------------------ plumbing
    def _open(self) -> None:
        """Open (create) the index; StoreError when it cannot be used for reading and writing."""
        if not self.root.is_dir():
            if not self.create:
                raise StoreError(f"no store at {self.root} (check [store] path)")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the store folder {self.root}: {e}") from e
        elif not self.create and not self.db_path.exists():  # a reader never leaves an empty index behind
            raise StoreError(f"no event index {DB_NAME} in {self.root} (the daemon has not run with this store yet)")
        db: sqlite3.Connection | None = None
        try:
            self.events_dir.mkdir(exist_ok=True)
            db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            fresh = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
                               ).fetchone() is None
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of the process (not always a power cut) and never
            # waits for the disk to flush image files - the event row is committed before the stop is sent
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                migrate_rolls(db)  # schema 1 -> 2: rolls (pipeline/store/rolls.py)
                if fresh:
                    self._adopt_folders(db, set())
                self._apply_floor(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            st = os.stat(self.db_path)
        except (sqlite3.Error, OSError) as e:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            raise StoreError(f"cannot open the store index {self.db_path}: {e}") from e
        self._db, self._ident = db, (st.st_dev, st.st_ino)
        if self.problem:
            log.warning("store usable again", previous_problem=self.problem)
        self.problem = ""

    def _adopt_folders(self, db: sqlite3.Connection, known: set[str]) -> int:
        """Picture folders the index does not know with ids beyond its sequence were made by an index
        that was lost (removed, corrupt, restored from an older copy): new ids start above them and they
        are never deleted as orphans (meta ``kept_ranges``: id ranges ``[lo, hi]`` this index did not give).
        Returns how many such folders there are."""
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        seq = int(seq_row[0]) if seq_row else 0
        foreign = [fid for rel, fid in _event_folders(self.events_dir) if rel not in known and fid > seq]
        if not foreign:
            return 0
        top = max(foreign)
        ranges = [*self._kept_ranges(db), [seq + 1, top]]
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('kept_ranges', ?)", (json.dumps(ranges),))
        if seq_row:
            db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (top,))
        else:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (top,))
        log.warning("the index does not know some event folders (it was lost or replaced): they are kept, new "
                    "events get ids above them", folders=len(foreign), highest_id=top)
        return len(foreign)

    def raise_id_floor(self, event_id: int) -> None:
        """New event ids stay above ``event_id``: the latch holds it, maybe from an index that was lost,
        and a new index must not give the same id to another event. Applied now and whenever the index
        is opened again."""
        self.id_floor = max(self.id_floor, event_id)
        with contextlib.suppress(StoreError, sqlite3.Error), self._lock:
            if self._db is not None:
                with self._tx() as db:
                    self._apply_floor(db)

    def _apply_floor(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        if row is not None and int(row[0]) >= self.id_floor or row is None and self.id_floor <= 0:
            return
        if row is None:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (self.id_floor,))
        else:
            db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (self.id_floor,))

    @staticmethod
    def _kept_ranges(db: sqlite3.Connection) -> list[list[int]]:
        row = db.execute("SELECT value FROM meta WHERE key = 'kept_ranges'").fetchone()
        try:
            return [[int(a), int(b)] for a, b in json.loads(row[0])] if row else []
        except (ValueError, TypeError):
            return [[0, 2**62]]  # unreadable: keep every folder without a row

    def _unusable(self, reason: str, *, kind: str) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            self._db = None
            self._next_reopen = time.monotonic() + REOPEN_EVERY_S
        self._fail(kind, "the store index is unusable: events are kept in memory and written when it is back",
                   error=_no_paths(reason, self.root))
        self.problem = f"store index unusable: {_no_paths(reason, self.root)}"

    def _conn(self) -> sqlite3.Connection:
        """The open index, checked to be the file opened; opened again when it is time. Call with the lock."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._db is not None:
            try:
                st = os.stat(self.db_path)
                same = (st.st_dev, st.st_ino) == self._ident
            except OSError:
                same = False
            if same:
                return self._db
            self._unusable(f"{DB_NAME} was removed or replaced while in use", kind="index_lost")
            self._next_reopen = 0.0  # open the new one (or create it) at once
        if time.monotonic() < self._next_reopen:
            raise StoreError(self.problem or "the store index is unusable")
        try:
            self._open()
        except StoreError as e:
            self._next_reopen = time.monotonic() + REOPEN_EVERY_S
            self.problem = f"store index unusable: {_no_paths(str(e), self.root)}"
            raise
        assert self._db is not None
        return self._db

    @property
    def usable(self) -> bool:
        """The index is open (queries can run; writes may still fail, e.g. on a full disk)."""
        return self._db is not None

    def check(self) -> bool:
        """Is the store usable and writable now? Opens the index again when it is unusable, and probes a
        write while a write problem is reported (a disk that was full may have room again)."""
        with self._lock:
            try:
                self._conn()
                if self.problem:
                    with self._tx() as db:
                        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)",
                                   (str(time.time_ns()),))
                    self._ok()
            except (StoreError, sqlite3.Error) as e:
                if not self.problem:
                    self.problem = f"store index not writable: {_no_paths(str(e), self.root)}"
                return False
        return True

    def _ok(self) -> None:
        if self.problem:
            log.warning("store usable again", previous_problem=self.problem)
            self.problem = ""

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    def _fail(self, kind: str, msg: str, **kw: Any) -> None:
        self.errors[kind] += 1
        detail = kw.get("error") or kw.get("reason")
        self.last_error = f"{msg}: {detail}" if detail else msg
        log.error(msg, error_kind=kind, errors=self.errors[kind], **kw)

    def _write_failed(self, what: str, e: BaseException) -> None:
        self.problem = f"{what}: {_no_paths(str(e), self.root)}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def _dir_of(self, row_dir: str) -> Path:
        if not _DIR_RE.match(row_dir):
            raise StoreError(f"bad event folder {row_dir!r} in the index")
        return self.events_dir / row_dir

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ writing events
    def add_event(self, record: dict[str, Any], *, camera: str, t_wall_ns: int, seq: int, severity: str, action: str,
                  image_score: float, max_area_px: int) -> int:
        """Commit the event's row (state ``writing``) and return its id; ``record`` gets ``event_id``."""
        now = time.time_ns()
        day = dt.datetime.fromtimestamp(t_wall_ns / 1e9, tz=dt.UTC).strftime("%Y-%m-%d")
        action_state = "pending" if action in LATCHING_ACTIONS else "none"
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO events (camera, t_wall_ns, seq, severity, action, image_score, max_area_px, state, "
                    "dir, action_state, created_ns, record) VALUES (?, ?, ?, ?, ?, ?, ?, 'writing', '', ?, ?, '{}')",
                    (camera, int(t_wall_ns), int(seq), severity, action, float(image_score), int(max_area_px),
                     action_state, now))
                eid = _rowid(cur)
                record["event_id"] = eid
                record["event_dir"] = str(self.events_dir / day / f"{eid:08d}")
                record["roll_id"] = roll_of_new_event(db, now)  # the open roll (pipeline/store/rolls.py)
                db.execute("UPDATE events SET dir = ?, record = ?, roll_id = ? WHERE id = ?",
                           (f"{day}/{eid:08d}", json.dumps(record), record["roll_id"], eid))
        except (sqlite3.Error, StoreError) as e:
            self._fail("index", "cannot write the event to the store index", error=str(e), camera=camera)
            if isinstance(e, sqlite3.Error):
                self._write_failed("cannot write to the store index", e)
            raise StoreError(str(e)) from e
        self._ok()
        return eid

    def write_files(self, event_id: int, images: Mapping[str, np.ndarray]) -> bool:
        """Write the event's images (kinds of :data:`FILE_KINDS`) and its ``event.json``, each atomically;
        then the row turns ``complete``. On a file system error (disk full ...) the error is counted and
        logged, the row is flagged ``files_missing``, and False is returned: inspection goes on."""
        try:
            rows = self._query("SELECT dir FROM events WHERE id = ?", (event_id,))
        except (StoreError, sqlite3.Error) as e:
            self._fail("write", "cannot write the event's files: the index is unusable", event_id=event_id,
                       error=str(e))
            return False
        if not rows:
            return False
        folder = self._dir_of(rows[0]["dir"])
        total = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for kind, img in images.items():
                data = encode_image(kind, img)
                self._write_atomic(folder / FILE_KINDS[kind], data)
                total += len(data)
            with self._lock:
                rec = self._query("SELECT record FROM events WHERE id = ?", (event_id,))
                if not rec:  # deleted meanwhile (retention of a tiny store): leave nothing behind
                    shutil.rmtree(folder, ignore_errors=True)
                    return False
                data = rec[0]["record"].encode()
                self._write_atomic(folder / RECORD_FILE, data)
                total += len(data)
                self._fsync_dir(folder)
                missing = [k for k in images if not (folder / FILE_KINDS[k]).is_file()]
                state = "files_missing" if missing else "complete"
                with self._tx() as db:
                    db.execute("UPDATE events SET state = ?, bytes = ? WHERE id = ?", (state, total, event_id))
            if not missing:
                self._ok()
            return not missing
        except (OSError, sqlite3.Error, ValueError, StoreError) as e:
            self._fail("write", "cannot write the event's files (disk full?); inspection goes on",
                        event_id=event_id, error=f"{type(e).__name__}: {e}")
            if isinstance(e, OSError | sqlite3.Error):
                self._write_failed("cannot write event pictures", e)
            with contextlib.suppress(sqlite3.Error, StoreError):
                with self._tx() as db:
                    db.execute("UPDATE events SET state = 'files_missing', bytes = ? WHERE id = ?",
                               (self._folder_bytes(folder), event_id))
            return False

    def mark_files_missing(self, event_id: int, reason: str) -> None:
        """The event's pictures could not be made: flag the row (counted, logged)."""
        self._fail("snapshot", "event pictures could not be made", event_id=event_id, reason=reason)
        with contextlib.suppress(sqlite3.Error, StoreError):
            with self._tx() as db:
                db.execute("UPDATE events SET state = 'files_missing' WHERE id = ?", (event_id,))

    def _folder_bytes(self, folder: Path) -> int:
        total = 0
        with contextlib.suppress(OSError):
            for p in folder.iterdir():
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
        return total

    def update_record(self, event_id: int, patch: Mapping[str, Any] | None = None, *,
                      append_action: dict[str, Any] | None = None, **columns: Any) -> bool:
        """Merge ``patch`` into the event's record, append an action result to ``record["actions"]``,
        set index columns (severity, action, action_state, max_area_px: a tracked defect grew); rewrite
        ``event.json`` if it exists."""
        allowed = {"severity", "action", "action_state", "max_area_px"}
        if set(columns) - allowed:
            raise ValueError(f"cannot set {sorted(set(columns) - allowed)}")
        try:
            with self._lock:
                rows = self._query("SELECT dir, state, record FROM events WHERE id = ?", (event_id,))
                if not rows:
                    return False
                record = json.loads(rows[0]["record"])
                record.update(patch or {})
                record.update({k: v for k, v in columns.items() if k not in ("action_state", "max_area_px")})
                if append_action is not None:
                    record.setdefault("actions", []).append(append_action)
                text = json.dumps(record)
                with self._tx() as db:
                    sets = ", ".join(f"{k} = ?" for k in columns)
                    db.execute(f"UPDATE events SET record = ?{', ' + sets if sets else ''} WHERE id = ?",
                               (text, *columns.values(), event_id))
                if rows[0]["state"] == "complete":
                    self._write_atomic(self._dir_of(rows[0]["dir"]) / RECORD_FILE, text.encode())
            return True
        except (OSError, sqlite3.Error, StoreError) as e:
            self._fail("update", "cannot update the event record", event_id=event_id, error=str(e))
            return False

    # ------------------------------------------------------------------ start-up repair
    def recover(self) -> dict[str, int]:
        """Delete temporary leftovers and the folders of rows this index deleted (a crash between the
        row's and the folder's deletion); flag rows whose files are missing. Folders the index never
        knew (it was lost, corrupt or replaced: their ids lie beyond its sequence) are kept, never
        deleted as orphans. StoreError when the index is unusable (nothing is touched then)."""
        report = Counter[str]()
        with self._lock:
            rows = self._query("SELECT id, dir, state FROM events")
            known = {r["dir"] for r in rows}
            with self._tx() as db:
                self._adopt_folders(db, known)
                seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
                kept = self._kept_ranges(db)
            seq = int(seq_row[0]) if seq_row else 0
            for day in sorted(self.events_dir.iterdir()) if self.events_dir.is_dir() else []:
                if _TMP_RE.match(day.name) and day.is_file():
                    day.unlink(missing_ok=True)
                    report["temp_files_removed"] += 1
                    continue
                if not day.is_dir():
                    continue
                for folder in sorted(day.iterdir()):
                    rel = f"{day.name}/{folder.name}"
                    if rel not in known:
                        fid = int(folder.name) if _DIR_RE.match(rel) else None
                        if fid is None or fid > seq or any(a <= fid <= b for a, b in kept):  # not this index's
                            report["unindexed_folders_kept"] += 1
                            continue
                        if folder.is_dir():
                            shutil.rmtree(folder, ignore_errors=True)
                        else:
                            folder.unlink(missing_ok=True)
                        report["orphan_folders_removed"] += 1
                        continue
                    for p in folder.iterdir():
                        if _TMP_RE.match(p.name):
                            p.unlink(missing_ok=True)
                            report["temp_files_removed"] += 1
                with contextlib.suppress(OSError):
                    day.rmdir()  # only when empty
            for r in rows:
                folder = self._dir_of(r["dir"])
                have = [k for k, name in FILE_KINDS.items() if (folder / name).is_file()]
                whole = len(have) == len(FILE_KINDS) and (folder / RECORD_FILE).is_file()
                if r["state"] == "writing" or (r["state"] == "complete" and not whole):
                    state = "complete" if whole else "files_missing"
                    with self._tx() as db:
                        db.execute("UPDATE events SET state = ?, bytes = ? WHERE id = ?",
                                   (state, self._folder_bytes(folder), r["id"]))
                    report["rows_completed" if whole else "rows_flagged_files_missing"] += 1
        if report:
            log.warning("store repaired after an unclean stop", **report)
        return dict(report)

    # ------------------------------------------------------------------ retention
    def total_bytes(self) -> int:
        return int(self._query("SELECT COALESCE(SUM(bytes), 0) AS b FROM events")[0]["b"])

    def enforce_retention(self, now_ns: int | None = None, max_delete: int = 1000) -> dict[str, int]:
        """Delete events past ``retention_days`` and, while the total exceeds ``max_gb``, the oldest;
        never kept events or stop/alarm events still waiting for an acknowledge."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        cutoff = now_ns - int(self.retention_s * 1e9)
        deletable = "keep = 0 AND NOT (acked_ns IS NULL AND action IN ('stop', 'alarm'))"
        deleted = freed = 0
        try:
            old = self._query(f"SELECT id, dir, bytes FROM events WHERE {deletable} AND t_wall_ns < ? "
                              "ORDER BY t_wall_ns, id LIMIT ?", (cutoff, max_delete))
            for r in old:
                freed += self._delete(r)
                deleted += 1
            total = self.total_bytes()
            if total > self.max_bytes:
                for r in self._query(f"SELECT id, dir, bytes FROM events WHERE {deletable} ORDER BY t_wall_ns, id "
                                     "LIMIT ?", (max_delete - deleted,)):
                    if total <= self.max_bytes:
                        break
                    freed += self._delete(r)
                    total -= int(r["bytes"])
                    deleted += 1
                if total > self.max_bytes:
                    log.warning("store is over its size limit, but the rest is kept or unacknowledged",
                                total_bytes=total, max_bytes=self.max_bytes)
        except (sqlite3.Error, OSError, StoreError) as e:
            self._fail("retention", "retention failed", error=str(e))
        if deleted:
            log.info("retention deleted old events", deleted=deleted, freed_bytes=freed)
        return {"deleted": deleted, "freed_bytes": freed}

    def _delete(self, row: sqlite3.Row) -> int:
        with self._tx() as db:  # the row first: a crash in between leaves an orphan folder, removed at start-up
            db.execute("DELETE FROM events WHERE id = ?", (row["id"],))
        shutil.rmtree(self._dir_of(row["dir"]), ignore_errors=True)
        return int(row["bytes"])

    # ------------------------------------------------------------------ queries (HTTP API, CLI)
    def _event_dict(self, r: sqlite3.Row, record: str | None = None) -> dict[str, Any]:
        folder = self._dir_of(r["dir"])
        d = {k: r[k] for k in r.keys() if k not in ("dir", "record")}
        d["time"] = iso_utc(r["t_wall_ns"])
        d["keep"] = bool(r["keep"])
        d["false_positive"] = bool(r["false_positive"])
        d["acknowledged"] = r["acked_ns"] is not None
        d["files"] = {k: (folder / name).is_file() for k, name in FILE_KINDS.items()}
        if record is not None:
            d["record"] = json.loads(record)
        return d

    def get_event(self, event_id: object) -> dict[str, Any] | None:
        """The event (index columns, ``record``, which ``files`` exist) or None. ValueError: bad id."""
        eid = parse_event_id(event_id)
        rows = self._query(f"SELECT {_EVENT_COLS}, record FROM events WHERE id = ?", (eid,))
        return self._event_dict(rows[0], rows[0]["record"]) if rows else None

    def list_events(self, *, camera: str | None = None, since_ns: int | None = None, until_ns: int | None = None,
                    severity: str | None = None, action: str | None = None, acknowledged: bool | None = None,
                    keep: bool | None = None, false_positive: bool | None = None, limit: int = 50,
                    offset: int = 0) -> dict[str, Any]:
        """Events newest first, filtered; ``{"items", "total", "limit", "offset"}``."""
        where: list[str] = []
        args: list[str | int] = []
        for col, val in (("camera", camera), ("severity", severity), ("action", action)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(str(val))
        if since_ns is not None:
            where.append("t_wall_ns >= ?")
            args.append(int(since_ns))
        if until_ns is not None:
            where.append("t_wall_ns < ?")
            args.append(int(until_ns))
        if acknowledged is not None:
            where.append("acked_ns IS NOT NULL" if acknowledged else "acked_ns IS NULL")
        for col, flag in (("keep", keep), ("false_positive", false_positive)):
            if flag is not None:
                where.append(f"{col} = ?")
                args.append(int(bool(flag)))
        limit = max(1, min(int(limit), MAX_PAGE))
        offset = max(0, int(offset))
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        total = self._query(f"SELECT COUNT(*) AS n FROM events {cond}", args)[0]["n"]
        rows = self._query(f"SELECT {_EVENT_COLS} FROM events {cond} ORDER BY t_wall_ns DESC, id DESC "
                           "LIMIT ? OFFSET ?", [*args, limit, offset])
        return {"items": [self._event_dict(r) for r in rows], "total": int(total), "limit": limit, "offset": offset}

    def set_keep(self, event_id: object, keep: bool = True) -> bool:
        """Mark an event kept (retention never deletes it) or not; False when there is no such event."""
        eid = parse_event_id(event_id)
        with self._tx() as db:
            return db.execute("UPDATE events SET keep = ? WHERE id = ?", (int(bool(keep)), eid)).rowcount == 1

    def mark_false_positive(self, event_id: object, value: bool = True, *, by: str = "", note: str = "") -> bool:
        """Mark (or unmark) an event as a false alarm, with who and why; False when there is no such event."""
        eid = parse_event_id(event_id)
        with self._tx() as db:
            cur = db.execute("UPDATE events SET false_positive = ?, fp_by = ?, fp_note = ?, fp_ns = ? WHERE id = ?",
                             (int(bool(value)), by[:200] or None, note[:2000] or None,
                              time.time_ns() if value else None, eid))
            return cur.rowcount == 1

    def file_path(self, event_id: object, kind: str) -> Path | None:
        """The path of an event's file of ``kind`` (frame|overlay|mask|thumb) when it exists, else None.
        Resolved only from the index and checked to lie inside the store; ValueError for a bad id or kind."""
        eid = parse_event_id(event_id)
        if kind not in FILE_KINDS:
            raise ValueError(f"file kind must be one of {', '.join(FILE_KINDS)}")
        rows = self._query("SELECT dir FROM events WHERE id = ?", (eid,))
        if not rows:
            return None
        try:
            path = (self._dir_of(rows[0]["dir"]) / FILE_KINDS[kind]).resolve()
        except StoreError:
            return None
        if not path.is_relative_to(self.events_dir.resolve()) or not path.is_file():
            return None
        return path

    # ------------------------------------------------------------------ latch and acknowledges
    def request_ack(self, by: str, camera: str | None = None, note: str = "") -> int:
        """Record an acknowledge of the latched stop/alarm (of one camera, or all) and return its id.
        It covers the events stored up to now; the alert stage applies it within about half a second
        (or at its next start) and records the handling in the same row (:meth:`get_ack`)."""
        by = (by or "").strip()[:200] or "unknown"
        try:
            with self._tx() as db:
                max_id = db.execute("SELECT COALESCE(MAX(id), 0) AS m FROM events").fetchone()["m"]
                cur = db.execute("INSERT INTO acks (requested_ns, ack_by, camera, note, max_event_id) "
                                 "VALUES (?, ?, ?, ?, ?)", (time.time_ns(), by, camera, note[:2000], int(max_id)))
                return _rowid(cur)
        except sqlite3.Error as e:
            raise StoreError(f"cannot record the acknowledge: {e}") from e

    def record_ack(self, *, by: str, camera: str | None, note: str, requested_ns: int, event_ids: list[int],
                   result: dict[str, Any] | None = None) -> int:
        """Record an acknowledge that was applied without the index (the latch file's mailbox, while the
        index was unusable): its row (handled now, ``result`` when its reset was confirmed) and the events
        it released that the index holds, marked acknowledged (``events_acked``: how many). Returns its
        id; StoreError when the index cannot take it."""
        ids = sorted({int(i) for i in event_ids if int(i) > 0})
        now = time.time_ns()
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO acks (requested_ns, ack_by, camera, note, max_event_id, handled_ns, handled_pid, "
                    "events_acked, cleared_ns, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (int(requested_ns), (by or "").strip()[:200] or "unknown", camera, (note or "")[:2000],
                     max(ids, default=0), now, os.getpid(), len(ids), now if result is not None else None,
                     json.dumps(result) if result is not None else None))
                ack_id = _rowid(cur)
                n = self._mark_acked(db, ids, ack_id, now)
                db.execute("UPDATE acks SET events_acked = ? WHERE id = ?", (n, ack_id))
        except sqlite3.Error as e:
            self._write_failed("cannot write to the store index", e)
            raise StoreError(f"cannot record the acknowledge: {e}") from e
        return ack_id

    def mark_acked(self, event_ids: list[int], ack_id: int | None) -> None:
        """Mark events acknowledged by ``ack_id`` (events written after their acknowledge: they were
        kept in memory while the index was unusable). StoreError when the index cannot take it."""
        try:
            with self._tx() as db:
                self._mark_acked(db, [int(i) for i in event_ids if int(i) > 0], ack_id, time.time_ns())
        except sqlite3.Error as e:
            self._write_failed("cannot write to the store index", e)
            raise StoreError(f"cannot mark events acknowledged: {e}") from e

    @staticmethod
    def _mark_acked(db: sqlite3.Connection, ids: list[int], ack_id: int | None, now: int) -> int:
        n = 0
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            n += db.execute(f"UPDATE events SET acked_ns = ?, ack_id = ? WHERE acked_ns IS NULL AND id IN "
                            f"({', '.join('?' * len(part))})", (now, ack_id, *part)).rowcount
        return n

    def acknowledged_ids(self, event_ids: list[int]) -> set[int]:
        """Those of ``event_ids`` the index holds as acknowledged."""
        ids = sorted({int(i) for i in event_ids if int(i) > 0})
        out: set[int] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows = self._query(f"SELECT id FROM events WHERE acked_ns IS NOT NULL AND id IN "
                               f"({', '.join('?' * len(part))})", part)
            out |= {int(r["id"]) for r in rows}
        return out

    def release_unconfirmed(self) -> dict[str, Any] | None:
        """The newest acknowledge when it was applied but its reset never confirmed, and no stop is
        latched in the index since: the proof that a stop the PLC still holds was acknowledged."""
        rows = self._query("SELECT * FROM acks ORDER BY id DESC LIMIT 1")
        if not rows or rows[0]["handled_ns"] is None or rows[0]["cleared_ns"] is not None:
            return None
        if any(e["action"] == "stop" for e in self.latched_events()):
            return None
        return self._ack_dict(rows[0])

    @staticmethod
    def _ack_dict(r: sqlite3.Row) -> dict[str, Any]:
        d = dict(r)
        d["by"] = d.pop("ack_by")
        d["requested"] = iso_utc(d["requested_ns"])
        d["handled"] = iso_utc(d["handled_ns"])
        d["cleared"] = iso_utc(d["cleared_ns"])
        return d

    def get_ack(self, ack_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM acks WHERE id = ?", (int(ack_id),))
        return self._ack_dict(rows[0]) if rows else None

    def list_acks(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM acks ORDER BY id DESC LIMIT ?", (max(1, min(int(limit), MAX_PAGE)),))
        return [self._ack_dict(r) for r in rows]

    def pending_acks(self) -> list[dict[str, Any]]:
        return [self._ack_dict(r) for r in self._query("SELECT * FROM acks WHERE handled_ns IS NULL ORDER BY id")]

    def apply_ack(self, ack_id: int) -> list[dict[str, Any]]:
        """Mark the events an acknowledge covers as acknowledged (and the ack as handled); returns them."""
        with self._tx() as db:
            ack = db.execute("SELECT * FROM acks WHERE id = ?", (ack_id,)).fetchone()
            if ack is None or ack["handled_ns"] is not None:
                return []
            cond = "acked_ns IS NULL AND id <= ?"
            args: list[Any] = [ack["max_event_id"]]
            if ack["camera"] is not None:
                cond += " AND camera = ?"
                args.append(ack["camera"])
            events = db.execute(f"SELECT id, camera, action, action_state FROM events WHERE {cond}", args).fetchall()
            now = time.time_ns()
            db.execute(f"UPDATE events SET acked_ns = ?, ack_id = ? WHERE {cond}", [now, ack_id, *args])
            db.execute("UPDATE acks SET handled_ns = ?, handled_pid = ?, events_acked = ? WHERE id = ?",
                       (now, os.getpid(), len(events), ack_id))
        return [dict(e) for e in events]

    def ack_cleared(self, ack_id: int, result: dict[str, Any]) -> None:
        """Record that the outputs were confirmed reset after acknowledge ``ack_id``."""
        with self._tx() as db:
            db.execute("UPDATE acks SET cleared_ns = ?, result = ? WHERE id = ?",
                       (time.time_ns(), json.dumps(result), ack_id))

    def is_acknowledged(self, event_id: int) -> bool:
        rows = self._query("SELECT acked_ns FROM events WHERE id = ?", (int(event_id),))
        return bool(rows) and rows[0]["acked_ns"] is not None

    def latched_events(self) -> list[dict[str, Any]]:
        """The unacknowledged stop / alarm events (id, camera, action): the latch as the index holds it."""
        rows = self._query("SELECT id, camera, action FROM events WHERE acked_ns IS NULL "
                           "AND action IN ('stop', 'alarm') ORDER BY id")
        return [dict(r) for r in rows]

    def latched(self) -> dict[str, list[str]]:
        """Cameras with unacknowledged stop / alarm events."""
        out: dict[str, list[str]] = {a: [] for a in LATCHING_ACTIONS}
        for e in self.latched_events():
            if e["camera"] not in out[e["action"]]:
                out[e["action"]].append(e["camera"])
        return {a: sorted(c) for a, c in out.items()}

    def unconfirmed_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Unacknowledged stop/alarm events whose action was never confirmed (e.g. the process died)."""
        rows = self._query(f"SELECT {_EVENT_COLS}, record FROM events WHERE action_state = 'pending' AND "
                           "acked_ns IS NULL ORDER BY id DESC LIMIT ?", (int(limit),))
        return [self._event_dict(r, r["record"]) for r in reversed(rows)]

    def stats(self) -> dict[str, Any]:
        """Counts and health: ``events``/``bytes`` (-1 while unreadable), ``errors`` by kind, ``usable``
        and ``problem`` (why the store is degraded; "" when it works)."""
        try:
            r = self._query("SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM events")[0]
            n, b = int(r["n"]), int(r["b"])
        except (sqlite3.Error, StoreError):
            n = b = -1
        return {"events": n, "bytes": b, "errors": dict(self.errors), "last_error": self.last_error,
                "usable": self.usable, "problem": self.problem}
