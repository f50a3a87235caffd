from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from knitwatch.pipeline import wire


def test_round_trip_over_a_real_socket() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    b.bind("inproc://t")
    a.connect("inproc://t")
    frame = np.arange(12, dtype=np.uint8).reshape(3, 4)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 4, 4), dtype=np.uint8)
    wire.send(a, "tiles", {"cam": "c", "seq": 7, "t_wall_ns": 1, "t_mono_ns": 2, "grid": {}}, [tiles, frame])
    msg = wire.recv(b)
    assert msg.kind == "tiles" and msg["seq"] == 7
    np.testing.assert_array_equal(msg.arrays[0], tiles)
    np.testing.assert_array_equal(msg.arrays[1], frame)
    a.close(0)
    b.close(0)
    ctx.term()


def good_parts() -> list[bytes]:
    return [bytes(p) for p in wire.encode("frame", {"cam": "c", "seq": 0, "t_wall_ns": 0, "t_mono_ns": 0},
                                          [np.zeros((2, 3), np.uint8)])]


def mutate_header(**changes: object) -> list[bytes]:
    parts = good_parts()
    head = json.loads(parts[0])
    head.update(changes)
    return [json.dumps(head).encode(), *parts[1:]]


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([], "empty"),
        ([b"not json"], "not JSON"),
        ([b"[1, 2]"], "not a JSON object"),
        (mutate_header(v=99), "version 99"),
        (mutate_header(kind="nope"), "unknown message kind"),
        (mutate_header(seq=None) [:1] + [b"\0" * 6], None),  # None seq is allowed by shape: decodes
        (good_parts()[:1], "needs 1 buffer"),
        (good_parts() + [b"x"], "needs 1 buffer"),
        ([good_parts()[0], b"\0" * 5], "needs 6"),
        (mutate_header(bufs=[{"shape": [2, 3], "dtype": "object"}]), "bad shape/dtype"),
        (mutate_header(bufs=[{"shape": [-1, 3], "dtype": "uint8"}]), "bad shape/dtype"),
    ],
)
def test_malformed_messages_raise_wire_error(parts: list[bytes], reason: str | None) -> None:
    if reason is None:
        assert wire.decode(parts).kind == "frame"
        return
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(parts)


def test_missing_required_header_key() -> None:
    head = json.loads(good_parts()[0])
    del head["cam"]
    with pytest.raises(wire.WireError, match="lacks cam"):
        wire.decode([json.dumps(head).encode(), b"\0" * 6])
