"""Store queries shared by the command line and the HTTP API: times as people type them, paging."""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the database module imports OpenCV: the command line imports this module at start
    from knitwatch.pipeline.store.database import Store

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_AGE_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH_RE = re.compile(r"\d{9,11}(\.\d+)?")
# the store keeps ns since the epoch in SQLite's signed 64-bit integers: 1970-01-01 ... 2262-04-11
MAX_TIME_NS = 2**63 - 1
TIME_RANGE = "1970-01-01 and 2262-04-11"


def _shown(text: str) -> str:
    """``text`` for a message: quoted, and cut short when long (it may come from a URL)."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def _ns(seconds: float, text: str) -> int:
    """Epoch seconds as ns, ValueError when out of the store's range (or not a finite number)."""
    if not math.isfinite(seconds) or not 0 <= seconds * 1e9 <= MAX_TIME_NS:
        raise ValueError(f"{_shown(text)} is out of range: times must lie between {TIME_RANGE}")
    return min(int(seconds * 1e9), MAX_TIME_NS)


def parse_time(text: str, now: dt.datetime | None = None) -> int:
    """A point in time as ns since the epoch, from what a person types:

    - an age: ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` (that long before now);
    - ``now``, ``today`` (local midnight), ``yesterday``;
    - an ISO 8601 date or time (``2024-05-01``, ``2024-05-01T14:30``, ``...Z``, ``...+02:00``;
      without a zone it is local time);
    - epoch seconds (``1714550000``, fractions allowed).

    ValueError with a hint otherwise, and for times outside 1970-01-01 ... 2262-04-11 (what the store
    can hold)."""
    now = now or dt.datetime.now().astimezone()
    s = str(text).strip()
    if not s:
        raise ValueError("empty time")
    m = _AGE_RE.match(s)
    if m:
        return _ns(now.timestamp() - float(m.group(1)) * _AGE_S[m.group(2).lower()], s)
    low = s.lower()
    if low == "now":
        return _ns(now.timestamp(), s)
    if low in ("today", "yesterday"):
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if low == "yesterday":
            midnight -= dt.timedelta(days=1)
        return _ns(midnight.timestamp(), s)
    if _EPOCH_RE.fullmatch(s):
        return _ns(float(s), s)
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise ValueError(f"cannot read {_shown(s)} as a time: use an age (30m, 2h, 7d), today, an ISO date/time "
                         "(2024-05-01T14:30) or epoch seconds") from None
    try:
        if t.tzinfo is None:
            t = t.astimezone()  # local time
        seconds = t.timestamp()
    except (OverflowError, ValueError, OSError):  # years 1 or 9999 in some zones
        seconds = math.nan
    return _ns(seconds, s)


def iter_events(store: Store, filters: dict[str, Any], limit: int | None = None) -> list[dict[str, Any]]:
    """Every event matching ``filters`` (the keywords of :meth:`Store.list_events`), newest first, page
    by page; at most ``limit`` of them."""
    from knitwatch.pipeline.store.database import MAX_PAGE

    items: list[dict[str, Any]] = []
    offset = 0
    while limit is None or len(items) < limit:
        page = store.list_events(**filters, limit=MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(items)),
                                 offset=offset)
        items += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            break
    return items
