"""The wire format between pipeline stages: a versioned JSON header plus raw buffers, multipart.

A message is ``[header_json, buffer_0, buffer_1, ...]`` (on a ROUTER socket preceded by the peer's
identity frame). The header names the message ``kind``, the
format version ``v`` and, for each buffer, its shape and dtype under ``bufs``; buffers travel as
raw bytes, sent zero-copy. :func:`decode` checks everything a receiver relies on and raises
:class:`WireError` for anything else: receivers count and drop such messages, they never crash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

VERSION = 1
KINDS = ("frame", "tiles", "result", "heartbeat", "credit")
_DTYPES = {"uint8", "float16", "float32"}
_MAX_HEADER = 1 << 20

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


class WireError(ValueError):
    """A message that cannot be used (wrong version, shape, size, JSON ...)."""


@dataclass
class Message:
    kind: str
    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


def encode(kind: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """Multipart frames for ``socket.send_multipart(..., copy=False)``; arrays are sent without copying."""
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    bufs = []
    parts: list[Any] = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise WireError(f"dtype {a.dtype} cannot be sent")
        bufs.append({"shape": list(a.shape), "dtype": a.dtype.name})
        parts.append(a.data.cast("B") if a.size else b"")
    head = {**header, "v": VERSION, "kind": kind, "bufs": bufs}
    return [json.dumps(head, separators=(",", ":")).encode(), *parts]


def decode(parts: list[Any]) -> Message:
    """Parse and validate a received multipart message. Raises :class:`WireError`."""
    if not parts:
        raise WireError("empty message")
    raw = parts[0].bytes if isinstance(parts[0], zmq.Frame) else parts[0]
    if len(raw) > _MAX_HEADER:
        raise WireError(f"header of {len(raw)} bytes is too large")
    try:
        head = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(head, dict):
        raise WireError("header is not a JSON object")
    if head.get("v") != VERSION:
        raise WireError(f"message version {head.get('v')!r}, expected {VERSION}")
    kind = head.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    missing = [k for k in REQUIRED[kind] if k not in head]
    if missing:
        raise WireError(f"{kind} message lacks {', '.join(missing)}")
    bufs = head.get("bufs")
    if not isinstance(bufs, list) or len(bufs) != NBUFS[kind] or len(parts) != 1 + len(bufs):
        raise WireError(f"{kind} message needs {NBUFS[kind]} buffer(s), got {len(parts) - 1}")
    arrays = []
    for i, (spec, part) in enumerate(zip(bufs, parts[1:], strict=True)):
        try:
            shape = tuple(int(s) for s in spec["shape"])
            dtype = np.dtype(spec["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"buffer {i}: bad shape/dtype ({e})") from None
        if dtype.name not in _DTYPES or any(s < 0 for s in shape):
            raise WireError(f"buffer {i}: bad shape/dtype {shape} {dtype}")
        buf = part.buffer if isinstance(part, zmq.Frame) else part
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(memoryview(buf).cast("B")) != expected:
            raise WireError(f"buffer {i}: {len(memoryview(buf))} bytes, shape {shape} {dtype} needs {expected}")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return Message(kind, head, arrays)


def send(sock: zmq.Socket, kind: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = (),
         flags: int = 0) -> None:
    sock.send_multipart(encode(kind, header, arrays), flags=flags, copy=False)


def recv(sock: zmq.Socket, flags: int = 0) -> Message:
    """Receive one message; :class:`WireError` when it is malformed (it has been consumed)."""
    return decode(sock.recv_multipart(flags=flags, copy=False))


def recv_routed(sock: zmq.Socket, flags: int = 0) -> tuple[bytes, Message]:
    """Receive on a ROUTER socket: (peer identity, message). :class:`WireError` when malformed."""
    parts = sock.recv_multipart(flags=flags, copy=False)
    if len(parts) < 2:
        raise WireError("routed message without identity")
    return parts[0].bytes, decode(parts[1:])


def send_routed(sock: zmq.Socket, peer: bytes, kind: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = (),
                flags: int = 0) -> None:
    sock.send_multipart([peer, *encode(kind, header, arrays)], flags=flags, copy=False)
