"""Rolls in the defect store: the ``rolls`` table, the roll of each event, the schema migration.

A *roll* is the fabric knitted between two doffs (the roll taken off the machine). Exactly one roll
is open at a time (the daemon watches one machine); every event gets the id of the roll that is open
when its row is written (``events.roll_id``, also in its record). A new roll closes the open one and
starts on

* ``knitwatch roll new`` and ``POST /api/rolls`` (reasons ``command`` / ``api``): a row in ``rolls``
  written by whoever asks, like an acknowledge; the alert stage sees it within about half a second,
  and records where each camera's fabric position was (``start_pos``, revolutions) and where the
  previous roll ended (its ``end_pos``) - the row is then *handled*;
* the PLC's doff signal (reason ``doff``, :mod:`knitwatch.pipeline.actions.doff`), read by the alert
  stage, which writes the same row;
* the first event of a store without a roll (reason ``first event``).

While a roll is open the alert stage keeps its ``end_pos`` up to date (every few seconds), so the
length knitted so far is known. Positions are revolutions as floats: the revolution counter plus the
fraction of the circumference (when known).

Schema 1 -> 2 (:func:`migrate_rolls`, run whenever the index is opened): the ``roll_id`` column is
added to ``events``; the events of an old store go into one roll (reason ``migration``) that starts at
the oldest event and stays open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

ROLL_REASONS = ("command", "api", "doff", "first event", "migration")
SCHEMA_WITH_ROLLS = 2

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


def parse_roll_id(value: object) -> int:
    """A valid roll id from user input (int or decimal string); ValueError otherwise."""
    from knitwatch.pipeline.store.database import parse_event_id

    try:
        return parse_event_id(value)  # the same rules as an event id
    except ValueError:
        raise ValueError("roll id must be a positive integer") from None


def _iso(t_ns: int | None) -> str | None:
    from knitwatch.pipeline.store.database import iso_utc

    return iso_utc(t_ns)


def _json_or_none(text: str | None) -> Any:  # noqa: ANN401
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _positions(value: dict[str, float] | None) -> str | None:
    if not value:
        return None
    return json.dumps({str(k): round(float(v), 4) for k, v in value.items()})


def migrate_rolls(db: sqlite3.Connection) -> bool:
    """Bring an index to the rolls schema (inside the caller's transaction): ``events.roll_id``, its
    index, and - for a store that has events but no rolls - one roll holding them. True when migrated."""
    cols = {str(r[1]) for r in db.execute("PRAGMA table_info(events)")}
    migrated = False
    if "roll_id" not in cols:
        db.execute("ALTER TABLE events ADD COLUMN roll_id INTEGER")
        first = db.execute("SELECT MIN(t_wall_ns) AS t, COUNT(*) AS n FROM events").fetchone()
        if first[1]:
            now = time.time_ns()
            cur = db.execute(
                "INSERT INTO rolls (started_ns, reason, started_by, note, handled_ns) VALUES (?, 'migration', "
                "'knitwatch', 'the events recorded before rolls were kept', ?)", (int(first[0]), now))
            db.execute("UPDATE events SET roll_id = ?", (cur.lastrowid,))
        migrated = True
    db.execute("CREATE INDEX IF NOT EXISTS events_roll ON events (roll_id)")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_WITH_ROLLS),))
    return migrated


def roll_of_new_event(db: sqlite3.Connection, now_ns: int) -> int:
    """The open roll's id for an event being written (inside its transaction); a store without an open
    roll opens one (reason ``first event``)."""
    row = db.execute("SELECT id FROM rolls WHERE ended_ns IS NULL ORDER BY id DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0])
    cur = db.execute("INSERT INTO rolls (started_ns, reason, started_by) VALUES (?, 'first event', 'knitwatch')",
                     (int(now_ns),))
    assert cur.lastrowid is not None
    return int(cur.lastrowid)


class RollsMixin:
    """The rolls part of :class:`knitwatch.pipeline.store.database.Store` (its transaction and query
    helpers do the work)."""

    if TYPE_CHECKING:
        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]: ...
        def _event_dict(self, r: sqlite3.Row, record: str | None = None) -> dict[str, Any]: ...

    def new_roll(self, reason: str, by: str, *, note: str = "", machine: str | None = None,
                 cameras: list[str] | None = None, t_ns: int | None = None) -> int:
        """Close the open roll and start a new one; its id. ``machine``/``cameras`` None: the previous
        roll's. The alert stage records the fabric position at the change (:meth:`roll_handled`)."""
        if reason not in ROLL_REASONS:
            raise ValueError(f"roll reason must be one of {', '.join(ROLL_REASONS)}")
        try:
            return self._new_roll(reason, by, note, machine, cameras, t_ns)
        except sqlite3.Error as e:
            from knitwatch.pipeline.store.database import StoreError

            raise StoreError(f"cannot start a roll: {e}") from e

    def _new_roll(self, reason: str, by: str, note: str, machine: str | None, cameras: list[str] | None,
                  t_ns: int | None) -> int:
        now = int(t_ns) if t_ns is not None else time.time_ns()
        by = (by or "").strip()[:200] or "unknown"
        with self._tx() as db:
            prev = db.execute("SELECT machine, cameras FROM rolls ORDER BY id DESC LIMIT 1").fetchone()
            if machine is None:
                machine = str(prev["machine"]) if prev is not None else ""
            cams = json.dumps(list(cameras)) if cameras is not None else (prev["cameras"] if prev else None)
            db.execute("UPDATE rolls SET ended_ns = ? WHERE ended_ns IS NULL", (now,))
            cur = db.execute("INSERT INTO rolls (started_ns, reason, started_by, note, machine, cameras) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (now, reason, by, (note or "")[:2000], machine[:200], cams))
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    @staticmethod
    def _roll_dict(r: sqlite3.Row) -> dict[str, Any]:
        return {"id": int(r["id"]), "started": _iso(r["started_ns"]), "ended": _iso(r["ended_ns"]),
                "started_ns": r["started_ns"], "ended_ns": r["ended_ns"], "open": r["ended_ns"] is None,
                "reason": r["reason"], "by": r["started_by"], "note": r["note"], "machine": r["machine"],
                "cameras": _json_or_none(r["cameras"]), "handled": _iso(r["handled_ns"]),
                "start_pos": _json_or_none(r["start_pos"]) or {}, "end_pos": _json_or_none(r["end_pos"]) or {},
                "events": int(r["n_events"])}

    _ROLL_SELECT = ("SELECT rolls.*, (SELECT COUNT(*) FROM events WHERE events.roll_id = rolls.id) AS n_events "
                    "FROM rolls")

    def get_roll(self, roll_id: object) -> dict[str, Any] | None:
        """The roll (with its number of events) or None. ValueError: bad id."""
        rid = parse_roll_id(roll_id)
        rows = self._query(f"{self._ROLL_SELECT} WHERE id = ?", (rid,))
        return self._roll_dict(rows[0]) if rows else None

    def current_roll(self, count_events: bool = True) -> dict[str, Any] | None:
        """The open roll, or None (no roll yet); ``count_events`` False: ``events`` is -1 (a cheaper query,
        for the alert stage's polling)."""
        select = self._ROLL_SELECT if count_events else "SELECT rolls.*, -1 AS n_events FROM rolls"
        rows = self._query(f"{select} WHERE ended_ns IS NULL ORDER BY id DESC LIMIT 1")
        return self._roll_dict(rows[0]) if rows else None

    def list_rolls(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """Rolls newest first: ``{"items", "total", "limit", "offset"}``."""
        limit = max(1, min(int(limit), 500))
        offset = max(0, int(offset))
        total = int(self._query("SELECT COUNT(*) AS n FROM rolls")[0]["n"])
        rows = self._query(f"{self._ROLL_SELECT} ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset))
        return {"items": [self._roll_dict(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    def pending_rolls(self) -> list[dict[str, Any]]:
        """Rolls the alert stage has not yet taken (their start position is not recorded), oldest first
        (``events``: -1, not counted)."""
        rows = self._query("SELECT rolls.*, -1 AS n_events FROM rolls WHERE handled_ns IS NULL ORDER BY id")
        return [self._roll_dict(r) for r in rows]

    def roll_handled(self, roll_id: int, start_pos: dict[str, float] | None,
                     previous_end_pos: dict[str, float] | None = None) -> None:
        """The alert stage took the roll: where each camera's fabric was at its start (revolutions), and
        where the roll before it ended (merged into that roll's ``end_pos``)."""
        with self._tx() as db:
            db.execute("UPDATE rolls SET handled_ns = ?, start_pos = COALESCE(?, start_pos) WHERE id = ?",
                       (time.time_ns(), _positions(start_pos), int(roll_id)))
            if previous_end_pos:
                prev = db.execute("SELECT id, end_pos FROM rolls WHERE id < ? ORDER BY id DESC LIMIT 1",
                                  (int(roll_id),)).fetchone()
                if prev is not None:
                    merged = {**(_json_or_none(prev["end_pos"]) or {}), **previous_end_pos}
                    db.execute("UPDATE rolls SET end_pos = ? WHERE id = ?", (_positions(merged), prev["id"]))

    def set_roll_start(self, roll_id: int, camera: str, pos: float) -> None:
        """A camera's start position of a roll that has none for it yet (the daemon started after the roll)."""
        with self._tx() as db:
            row = db.execute("SELECT start_pos FROM rolls WHERE id = ?", (int(roll_id),)).fetchone()
            if row is None:
                return
            start = _json_or_none(row["start_pos"]) or {}
            if camera not in start:
                start[camera] = pos
                db.execute("UPDATE rolls SET start_pos = ? WHERE id = ?", (_positions(start), int(roll_id)))

    def update_roll_position(self, roll_id: int, end_pos: dict[str, float]) -> None:
        """Where each camera's fabric is now (the open roll's ``end_pos``: the length knitted so far)."""
        if not end_pos:
            return
        with self._tx() as db:
            row = db.execute("SELECT end_pos FROM rolls WHERE id = ?", (int(roll_id),)).fetchone()
            if row is None:
                return
            merged = {**(_json_or_none(row["end_pos"]) or {}), **end_pos}
            db.execute("UPDATE rolls SET end_pos = ? WHERE id = ?", (_positions(merged), int(roll_id)))

    def roll_events(self, roll_id: int) -> list[dict[str, Any]]:
        """The roll's events, oldest first, each with its record and its picture paths relative to the
        store folder (``pictures``: kind -> path, only files that exist)."""
        from knitwatch.pipeline.store.database import _EVENT_COLS, EVENTS_DIR, FILE_KINDS

        rows = self._query(f"SELECT {_EVENT_COLS}, dir, record FROM events WHERE roll_id = ? "
                           "ORDER BY t_wall_ns, id", (int(roll_id),))
        out = []
        for r in rows:
            d = self._event_dict(r, r["record"])
            d["pictures"] = {k: f"{EVENTS_DIR}/{r['dir']}/{name}" for k, name in FILE_KINDS.items()
                             if d["files"].get(k)}
            out.append(d)
        return out
