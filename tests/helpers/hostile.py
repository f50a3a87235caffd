"""Hostile input for the stages' sockets: type-confused and random messages, from a seeded generator.

:func:`confused` replaces one header field of a valid message with a value of the wrong type (the
measured crashes: a sequence number or timestamp as a string, a camera id as a list, a score as a
string); :func:`fuzz_parts` draws anything from random bytes to nearly valid messages.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessParams, preprocess

#: values of the wrong type (or out of range) for any field
WRONG: list[Any] = [
    "7", "", "x" * 300, ["c"], [1, 2], {"a": 1}, None, True, False, -1, 2**64, 1.5, -0.0, 1e308,
    [[[]]], {"cam": "c"}, "NaN", [None], {"": []},
]


def frame_header(seq: int, cam: str = "c") -> dict[str, Any]:
    return {"cam": cam, "seq": seq, "epoch": 1, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns()}


def valid(kind: str, seq: int = 0, cam: str = "c", tile: int = 32) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A well-formed message of ``kind``: (header, arrays)."""
    frame = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 2654435761 % 251).astype(np.uint8)
    if kind == "frame":
        return frame_header(seq, cam), [frame]
    if kind == "tiles":
        tiles, grid = preprocess(frame, PreprocessParams(tile=tile, stride=tile))
        return {**frame_header(seq, cam), "t_tiled_ns": time.monotonic_ns(), "grid": grid.to_dict(), "scale": 1.0}, [
            tiles, frame]
    if kind == "result":
        amap = np.zeros(frame.shape, np.float32)
        return {**frame_header(seq, cam), "image_score": 0.0, "tile_scores": [0.0] * 6, "model_ms": 1.0,
                "batch_tiles": 6, "worker": "infer.0"}, [amap, frame]
    if kind == "credit":
        return {"n": 0}, []
    if kind == "heartbeat":
        return {"stage": "capture.c", "pid": 1, "stats": {"captured": 1, "dropped": 0, "ready": True}}, []
    raise ValueError(kind)


def encode_raw(kind: str, header: dict[str, Any], arrays: list[np.ndarray]) -> list[bytes]:
    return [bytes(p) for p in wire.encode(kind, header, arrays)]


def confused(kind: str, field: str, value: Any, seq: int = 0) -> list[bytes]:  # noqa: ANN401
    """A valid ``kind`` message with ``field`` set to ``value`` (a dotted field reaches into the grid)."""
    header, arrays = valid(kind, seq)
    head = header
    *path, last = field.split(".")
    for p in path:
        head = head[p]
    head[last] = value
    return encode_raw(kind, header, arrays)


def _random_json(rng: np.random.Generator, depth: int = 0) -> Any:  # noqa: ANN401
    r = rng.integers(0, 9 if depth < 3 else 6)
    if r == 0:
        return int(rng.integers(-(2**63), 2**63 - 1))
    if r == 1:
        return float(rng.normal() * 10.0 ** int(rng.integers(0, 300)))
    if r == 2:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, rng.integers(0, 12)))
    if r == 3:
        return bool(rng.integers(0, 2))
    if r == 4:
        return None
    if r == 5:
        return WRONG[int(rng.integers(0, len(WRONG)))]
    if r in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(_random_json(rng, 3))[:8]: _random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def fuzz_parts(rng: np.random.Generator, kinds: tuple[str, ...] = wire.KINDS) -> list[bytes]:
    """One hostile multipart message: random bytes, random JSON, deep nesting, non-finite numbers,
    or a valid message of one of ``kinds`` with fields replaced, removed or added and buffers bent."""
    r = int(rng.integers(0, 12))
    if r == 0:
        return [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(1, 4)))]
    if r == 1:
        return [json.dumps(_random_json(rng)).encode()]
    if r == 2:
        depth = int(rng.integers(100, 100000))
        return [b"[" * depth + b"]" * depth]
    if r == 3:
        return [b'{"v": 1, "kind": "credit", "n": NaN, "bufs": []}']
    kind = kinds[int(rng.integers(0, len(kinds)))]
    header, arrays = valid(kind, seq=int(rng.integers(0, 1000)))
    head = dict(header)
    for _ in range(int(rng.integers(1, 4))):
        keys = list(head) + ["grid.coords", "grid.tile", "grid.scaled_shape", "grid.roi", "grid.valid",
                             "grid.frame_shape", "stats.captured", "stats.cameras", "pos", "truth"]
        key = keys[int(rng.integers(0, len(keys)))]
        op = int(rng.integers(0, 4))
        target, name = head, key
        if "." in key:
            top, name = key.split(".", 1)
            if not isinstance(head.get(top), dict):
                continue
            target = head[top] = dict(head[top])
        if op == 0:
            target.pop(name, None)
        elif op == 1:
            target[name] = WRONG[int(rng.integers(0, len(WRONG)))]
        else:
            target[name] = _random_json(rng)
    try:
        parts = encode_raw(kind, head, arrays)
    except (TypeError, ValueError):  # a value json cannot encode
        return [rng.bytes(16)]
    r = int(rng.integers(0, 6))
    if r == 0 and len(parts) > 1:  # a buffer cut short or grown
        i = int(rng.integers(1, len(parts)))
        parts[i] = parts[i][: len(parts[i]) // 2] if rng.integers(0, 2) else parts[i] + b"\0" * 8
    elif r == 1:  # the buffer specs bent
        h = json.loads(parts[0])
        if h["bufs"]:
            spec = h["bufs"][int(rng.integers(0, len(h["bufs"])))]
            spec[["shape", "dtype"][int(rng.integers(0, 2))]] = _random_json(rng)
        parts[0] = json.dumps(h).encode()
    elif r == 2:  # another kind's name on it
        h = json.loads(parts[0])
        h["kind"] = wire.KINDS[int(rng.integers(0, len(wire.KINDS)))]
        parts[0] = json.dumps(h).encode()
    elif r == 3:  # an extra or a missing part
        parts = parts + [rng.bytes(4)] if rng.integers(0, 2) else parts[:-1] or [b""]
    return parts
