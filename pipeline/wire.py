"""The wire format between pipeline stages: a versioned JSON header plus raw buffers, multipart.

A message is ``[header_json, buffer_0, buffer_1, ...]`` (on a ROUTER socket preceded by the peer's
identity frame). The header names the message ``kind``, the
format version ``v`` and, for each buffer, its shape and dtype under ``bufs``; buffers travel as
raw bytes, sent zero-copy. :func:`decode` checks everything a receiver relies on - the framing here,
every header field's type and range and the buffers' dtype, shape and agreement with the header by
the kind's schema (:mod:`knitwatch.pipeline.messages`) - and raises :class:`WireError` for anything
else: receivers count and drop such messages (by ``reason``), they never crash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from knitwatch.pipeline import messages
from knitwatch.pipeline.messages import NBUFS, REQUIRED

VERSION = 1
KINDS = ("frame", "tiles", "result", "heartbeat", "credit")
_DTYPES = {"uint8", "float16", "float32"}
_MAX_HEADER = 1 << 20
_MAX_NDIM = 4
_MAX_DIM = 1 << 31

__all__ = ["KINDS", "NBUFS", "REQUIRED", "VERSION", "Message", "WireError", "decode", "encode", "recv",
           "recv_routed", "send", "send_routed"]


class WireError(ValueError):
    """A message that cannot be used (wrong version, shape, size, JSON, a field's type ...).

    ``reason``: a short key naming what was wrong (``json``, ``version``, ``kind``, ``<kind>.bufs``,
    ``<kind>.<field>`` ...), from a bounded set, for counting; the message says it in words."""

    def __init__(self, detail: str, reason: str = "malformed") -> None:
        super().__init__(detail)
        self.reason = reason


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
        raise WireError(f"unknown message kind {kind!r}", "kind")
    bufs = []
    parts: list[Any] = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise WireError(f"dtype {a.dtype} cannot be sent", f"{kind}.bufs")
        bufs.append({"shape": list(a.shape), "dtype": a.dtype.name})
        parts.append(a.data.cast("B") if a.size else b"")
    head = {**header, "v": VERSION, "kind": kind, "bufs": bufs}
    return [json.dumps(head, separators=(",", ":")).encode(), *parts]


def _short(value: Any) -> str:  # noqa: ANN401 - any JSON value, for a message
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode(parts: list[Any]) -> Message:
    """Parse and validate a received multipart message. Raises :class:`WireError`."""
    try:
        return _decode(parts)
    except RecursionError:  # JSON nested too deeply to parse, check or print
        raise WireError("header nested too deeply", "json") from None


def _decode(parts: list[Any]) -> Message:
    if not parts:
        raise WireError("empty message", "empty")
    raw = parts[0].bytes if isinstance(parts[0], zmq.Frame) else parts[0]
    if len(raw) > _MAX_HEADER:
        raise WireError(f"header of {len(raw)} bytes is too large", "header_size")
    try:
        head = json.loads(bytes(raw))  # NaN/Infinity parse: typed fields reject them
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"header is not JSON: {str(e)[:200]}", "json") from None
    if not isinstance(head, dict):
        raise WireError("header is not a JSON object", "json")
    if type(head.get("v")) is not int or head.get("v") != VERSION:
        raise WireError(f"message version {_short(head.get('v'))}, expected {VERSION}", "version")
    kind = head.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown message kind {_short(kind)}", "kind")
    bufs = head.get("bufs")
    if not isinstance(bufs, list) or len(bufs) != NBUFS[kind] or len(parts) != 1 + len(bufs):
        listed = len(bufs) if isinstance(bufs, list) else "no"
        raise WireError(f"{kind} message needs {NBUFS[kind]} buffer(s), got {len(parts) - 1} ({listed} in its header)",
                        f"{kind}.bufs")
    arrays = []
    for i, (spec, part) in enumerate(zip(bufs, parts[1:], strict=True)):
        shape_in = spec.get("shape") if isinstance(spec, dict) else None
        dtype_in = spec.get("dtype") if isinstance(spec, dict) else None
        if (not isinstance(shape_in, list) or len(shape_in) > _MAX_NDIM
                or any(type(s) is not int or not 0 <= s <= _MAX_DIM for s in shape_in)
                or not isinstance(dtype_in, str) or dtype_in not in _DTYPES):
            raise WireError(f"buffer {i}: bad shape/dtype {_short(spec)}", f"{kind}.bufs")
        shape = tuple(shape_in)
        dtype = np.dtype(dtype_in)
        buf = part.buffer if isinstance(part, zmq.Frame) else part
        expected = dtype.itemsize
        for s in shape:  # Python integers: a huge shape cannot overflow into a small size
            expected *= s
        got = len(memoryview(buf).cast("B"))
        if got != expected:
            raise WireError(f"buffer {i}: {got} bytes, shape {shape} {dtype} needs {expected}", f"{kind}.bufs")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    try:
        messages.check(kind, head, arrays)
    except messages.SchemaError as e:
        raise WireError(e.detail, e.reason) from None
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
        raise WireError("routed message without identity", "identity")
    return parts[0].bytes, decode(parts[1:])


def send_routed(sock: zmq.Socket, peer: bytes, kind: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = (),
                flags: int = 0) -> None:
    sock.send_multipart([peer, *encode(kind, header, arrays)], flags=flags, copy=False)
