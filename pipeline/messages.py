"""The schema of every message kind: what each header field and each buffer must be.

:func:`check` is called by :func:`knitwatch.pipeline.wire.decode` on every received message, so every
receiver (the stages, the supervisor's control socket, remote workers) sees only messages whose
fields have the types and ranges below; anything else raises :class:`SchemaError` with a short,
bounded ``reason`` (``"<kind>.<field>"``, used as a counter key) and a readable ``detail`` (logged).

Rules common to all kinds: integers are JSON integers (never booleans, strings or floats) within
0 .. 2**63-1 unless said otherwise; the numbers receivers compute with are finite; fields only passed
on for information (``scale``, ``pos``'s numbers, a stage's own statistics) are checked for their
type only, so that an odd value there never costs a frame its inspection or a stage its heartbeat;
optional fields may be absent (and, where noted, null); header keys not listed here are allowed and
passed on untouched (newer senders may add fields), so only the listed ones are relied upon.

========== ===========================================================================================
kind       header fields (besides ``v``, ``kind``, ``bufs``) and buffers
========== ===========================================================================================
frame      cam (camera id), seq, t_wall_ns, t_mono_ns; optional epoch, truth (object), pos (object:
           rev, offset_px, circumference_px, source, ok, cutline_px);
           1 buffer: the frame, uint8 (H, W) or (H, W, C) with C in 1, 3, 4
tiles      the frame's fields + grid (tile geometry), optional t_tiled_ns, scale, model (its model's id);
           2 buffers: tiles uint8 (N, T, T[, C]) matching the grid, and the frame matching grid.frame_shape
result     the frame's fields + image_score, tile_scores (list of floats), optional t_tiled_ns, scale,
           t_infer_ns, model_ms, batch_tiles, worker; 2 buffers: the anomaly map float32 (H, W) and
           the frame, of the map's H, W
credit     n (0 .. 2**30), optional received, cam, models (list of model ids); no buffer
heartbeat  stage (name), pid (1 .. 2**22), stats (object; see ``STATS_FIELDS``); no buffer
========== ===========================================================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

INT_MAX = 2**63 - 1
MAX_SIDE = 16384  # the largest camera side the settings allow
MAX_TILES = 1 << 20
CAMERA_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")  # the settings' camera id pattern
MODEL_ID = re.compile(r"^[^\x00-\x1f]{1,256}$")  # a model's id: an article@version or a checkpoint's id


class SchemaError(ValueError):
    """A message field of the wrong type, range or shape. ``reason``: ``<kind>.<field>`` (bounded)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def _show(value: Any) -> str:  # noqa: ANN401 - any JSON value
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(lo: int = 0, hi: int = INT_MAX) -> Check:
    def check(v: Any) -> str | None:  # noqa: ANN401
        if type(v) is not int:
            return f"must be an integer, got {type(v).__name__} {_show(v)}"
        if not lo <= v <= hi:
            return f"must be within {lo} .. {hi}, got {v}"
        return None

    return check


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:  # noqa: ANN401
        if type(v) not in (int, float):
            return f"must be a number, got {type(v).__name__} {_show(v)}"
        f = float(v)
        if not math.isfinite(f):
            return f"must be a finite number, got {v}"
        if f < lo or f > hi or (lo_open and f == lo):
            return f"must be within {'(' if lo_open else '['}{lo}, {hi}], got {v}"
        return None

    return check


def string(pattern: re.Pattern[str] | None = None, max_len: int = 256) -> Check:
    def check(v: Any) -> str | None:  # noqa: ANN401
        if not isinstance(v, str):
            return f"must be a string, got {type(v).__name__} {_show(v)}"
        if len(v) > max_len or (pattern is not None and not pattern.match(v)):
            return f"is not a valid name: {_show(v)}"
        return None

    return check


def boolean(v: Any) -> str | None:  # noqa: ANN401
    return None if isinstance(v, bool) else f"must be true or false, got {type(v).__name__} {_show(v)}"


def obj(v: Any) -> str | None:  # noqa: ANN401
    return None if isinstance(v, dict) else f"must be an object, got {type(v).__name__} {_show(v)}"


def nullable(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def fields(spec: dict[str, Check], required: Sequence[str] = ()) -> Check:
    """An object whose listed keys (when present) pass their checks; ``required`` keys must be there."""

    def check(v: Any) -> str | None:  # noqa: ANN401
        if not isinstance(v, dict):
            return f"must be an object, got {type(v).__name__} {_show(v)}"
        for key in required:
            if key not in v:
                return f"lacks {key!r}"
        for key, sub in spec.items():
            if key in v:
                problem = sub(v[key])
                if problem is not None:
                    return f"{key} {problem}"
        return None

    return check


def number_map(v: Any) -> str | None:  # noqa: ANN401 - {"p50": 1.2, ...}
    if not isinstance(v, dict):
        return f"must be an object, got {type(v).__name__} {_show(v)}"
    for key, value in v.items():
        if type(value) not in (int, float):
            return f"{key} must be a number, got {type(value).__name__} {_show(value)}"
    return None


def real(v: Any) -> str | None:  # noqa: ANN401 - a JSON number of any value (the receiver judges it)
    return None if type(v) in (int, float) else f"must be a number, got {type(v).__name__} {_show(v)}"


#: the position of the fabric in the frame (added by capture): types only - a position the alert
#: stage cannot use (not ok, not finite) is its to judge (it tracks in frame coordinates then), and
#: must never cost the frame its inspection
POS = fields({"rev": integer(-INT_MAX), "offset_px": real, "circumference_px": nullable(real),
              "source": string(max_len=64), "ok": boolean, "cutline_px": nullable(real)})

FRAME_FIELDS: dict[str, Check] = {
    "cam": string(CAMERA_ID),
    "seq": integer(),
    "t_wall_ns": integer(),
    "t_mono_ns": integer(),
    "epoch": nullable(integer()),
    "truth": obj,
    "pos": nullable(POS),
}
TILES_FIELDS: dict[str, Check] = {
    **FRAME_FIELDS,
    "t_tiled_ns": integer(),
    "scale": nullable(real),  # for information: nobody computes with it
    "grid": obj,  # checked with the buffers (check_grid)
    "model": string(MODEL_ID),  # the model to run the tiles with (pipeline/modelswitch.py)
}
RESULT_FIELDS: dict[str, Check] = {
    **TILES_FIELDS,
    "image_score": number(),
    "tile_scores": lambda v: _float_list(v, MAX_TILES),
    "t_infer_ns": integer(),
    "model_ms": number(0.0),
    "batch_tiles": integer(0, MAX_TILES),
    "worker": string(max_len=128),  # a remote worker's --name: free text
}
del RESULT_FIELDS["grid"]

#: the statistics a heartbeat carries: the keys the supervisor computes with are typed; other keys
#: are free (each stage reports its own counters, shown as they are)
CAMERA_STATS = fields({"inspected": integer(), "events": integer(), "defect_frames": integer(),
                       "escalations": integer(), "latency_ms": number_map}, required=("inspected",))
STATS_FIELDS: dict[str, Check] = {
    "ready": boolean,
    "captured": integer(),
    "dropped": integer(),
    "bad_messages": integer(),
    "cameras": lambda v: _map_of(v, CAMERA_STATS),
    "model_ms": number_map,
    "actions": nullable(obj),
    "store": nullable(obj),
    # the supervisor's own keys next to a stage's stats: a stage never sends them, nor may a forger
    "pid": integer(), "alive": boolean, "restarts": integer(), "last_heartbeat_s": number(),
}
HEARTBEAT_FIELDS: dict[str, Check] = {
    "stage": string(max_len=128),
    "pid": integer(1, 1 << 22),
    "stats": fields(STATS_FIELDS),
}
CREDIT_FIELDS: dict[str, Check] = {
    "n": integer(0, 1 << 30),
    "received": integer(),
    "cam": string(CAMERA_ID),
    "models": lambda v: _str_list(v, MODEL_ID, 64),  # a worker's models, ready to run
}

SCHEMAS: dict[str, dict[str, Check]] = {
    "frame": FRAME_FIELDS,
    "tiles": TILES_FIELDS,
    "result": RESULT_FIELDS,
    "credit": CREDIT_FIELDS,
    "heartbeat": HEARTBEAT_FIELDS,
}
#: header keys every message of a kind must carry (besides v, kind, bufs)
REQUIRED: dict[str, tuple[str, ...]] = {
    "frame": ("cam", "seq", "t_wall_ns", "t_mono_ns"),
    "tiles": ("cam", "seq", "t_wall_ns", "t_mono_ns", "grid"),
    "result": ("cam", "seq", "t_wall_ns", "t_mono_ns", "image_score", "tile_scores"),
    "heartbeat": ("stage", "pid", "stats"),
    "credit": ("n",),
}
#: how many buffers a kind carries
NBUFS = {"frame": 1, "tiles": 2, "result": 2, "heartbeat": 0, "credit": 0}


def _float_list(v: Any, max_len: int) -> str | None:  # noqa: ANN401
    if not isinstance(v, list):
        return f"must be a list of numbers, got {type(v).__name__} {_show(v)}"
    if len(v) > max_len:
        return f"holds {len(v)} values, at most {max_len}"
    for x in v:
        if type(x) not in (int, float) or not math.isfinite(x):
            return f"must hold finite numbers only, got {_show(x)}"
    return None


def _str_list(v: Any, pattern: re.Pattern[str], max_len: int) -> str | None:  # noqa: ANN401
    if not isinstance(v, list) or len(v) > max_len:
        return f"must be a list of at most {max_len} strings"
    for x in v:
        bad = string(pattern)(x)
        if bad:
            return f"item {bad}"
    return None


def _map_of(v: Any, check: Check) -> str | None:  # noqa: ANN401
    if not isinstance(v, dict):
        return f"must be an object, got {type(v).__name__} {_show(v)}"
    for key, value in v.items():
        problem = check(value)
        if problem is not None:
            return f"{key}: {problem}"
    return None


def _int_pairs(v: Any, n: int) -> np.ndarray | None:  # noqa: ANN401
    """``v`` as an (n, 2) int64 array when it is a list of n [int, int] pairs, else None."""
    if not isinstance(v, list) or len(v) != n:
        return None
    for p in v:
        if not (isinstance(p, list) and len(p) == 2 and type(p[0]) is int and type(p[1]) is int):
            return None
        if not (0 <= p[0] <= INT_MAX and 0 <= p[1] <= INT_MAX):
            return None
    return np.asarray(v, dtype=np.int64).reshape(n, 2)


def _ints(v: Any, n: int, lo: int = 0, hi: int = INT_MAX) -> list[int] | None:  # noqa: ANN401
    if not isinstance(v, list) or len(v) != n or any(type(x) is not int or not lo <= x <= hi for x in v):
        return None
    return v


def check_frame_array(kind: str, frame: np.ndarray) -> None:
    if frame.dtype != np.uint8:
        raise SchemaError(f"{kind}.frame", f"{kind}: the frame must be uint8, got {frame.dtype}")
    ok = frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3, 4))
    if not ok or not all(1 <= s <= MAX_SIDE for s in frame.shape[:2]):
        raise SchemaError(f"{kind}.frame", f"{kind}: the frame must be (H, W) or (H, W, 1|3|4) with sides of "
                          f"1 .. {MAX_SIDE}, got shape {frame.shape}")


def check_grid(grid: dict[str, Any], tiles: np.ndarray, frame: np.ndarray) -> None:
    """The tile geometry against the buffers it describes: every tile inside the scaled canvas, the
    canvas no larger than the tiles cover (so stitching cannot allocate more than the tiles carry),
    the ROI inside the frame."""

    def bad(detail: str) -> SchemaError:
        return SchemaError("tiles.grid", f"tiles: grid {detail}")

    if tiles.dtype != np.uint8 or tiles.ndim not in (3, 4) or (tiles.ndim == 4 and tiles.shape[3] not in (1, 3)):
        raise SchemaError("tiles.tiles", f"tiles: the tiles must be uint8 (N, T, T) or (N, T, T, 3), got "
                          f"{tiles.dtype} {tiles.shape}")
    n = int(tiles.shape[0])
    if not 1 <= n <= MAX_TILES:
        raise SchemaError("tiles.tiles", f"tiles: {n} tiles, expected 1 .. {MAX_TILES}")
    t = grid.get("tile")
    if type(t) is not int or not 1 <= t <= 4096 or tiles.shape[1:3] != (t, t):
        raise bad(f"tile {_show(t)} does not match tiles of shape {tiles.shape}")
    frame_shape = _ints(grid.get("frame_shape"), 2, 1, MAX_SIDE)
    if frame_shape is None or tuple(frame_shape) != frame.shape[:2]:
        raise bad(f"frame_shape {_show(grid.get('frame_shape'))} differs from the frame's {frame.shape[:2]}")
    roi = _ints(grid.get("roi"), 4)
    h, w = frame_shape
    if roi is None or not (roi[0] < roi[2] <= w and roi[1] < roi[3] <= h):
        raise bad(f"roi {_show(grid.get('roi'))} is not inside the frame of {w}x{h}")
    scaled = _ints(grid.get("scaled_shape"), 2, 1, INT_MAX)
    if scaled is None:
        raise bad(f"scaled_shape {_show(grid.get('scaled_shape'))} must be 2 positive integers")
    ph, pw = max(scaled[0], t), max(scaled[1], t)
    if ph * pw > n * t * t:
        raise bad(f"scaled_shape {scaled} is larger than {n} tiles of {t} px cover")
    coords = _int_pairs(grid.get("coords"), n)
    if coords is None:
        raise bad(f"coords must be {n} [y, x] pairs of integers (one per tile)")
    if (coords[:, 0] > ph - t).any() or (coords[:, 1] > pw - t).any():
        raise bad(f"coords put a tile outside the {ph}x{pw} canvas")
    valid = grid.get("valid")
    if not isinstance(valid, list) or len(valid) != n or any(not isinstance(x, bool) for x in valid):
        raise bad(f"valid must be {n} booleans (one per tile)")


def check(kind: str, head: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    """Check a decoded message of a known ``kind`` (buffer count and byte sizes already checked)."""
    missing = [k for k in REQUIRED[kind] if k not in head]
    if missing:
        raise SchemaError(f"{kind}.{missing[0]}", f"{kind} message lacks {', '.join(missing)}")
    for key, field_check in SCHEMAS[kind].items():
        if key in head:
            problem = field_check(head[key])
            if problem is not None:
                raise SchemaError(f"{kind}.{key}", f"{kind}: {key} {problem}")
    if kind == "frame":
        check_frame_array(kind, arrays[0])
    elif kind == "tiles":
        check_frame_array(kind, arrays[1])
        check_grid(head["grid"], arrays[0], arrays[1])
    elif kind == "result":
        amap, frame = arrays
        check_frame_array(kind, frame)
        if amap.dtype != np.float32 or amap.shape != frame.shape[:2]:
            raise SchemaError("result.map", f"result: the map must be float32 of the frame's {frame.shape[:2]}, "
                              f"got {amap.dtype} {amap.shape}")
