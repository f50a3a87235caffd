from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import TileGrid
from tests.helpers.hostile import confused, encode_raw, fuzz_parts, valid


def test_round_trip_over_a_real_socket() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    b.bind("inproc://t")
    a.connect("inproc://t")
    header, (tiles, frame) = valid("tiles", seq=7)
    wire.send(a, "tiles", header, [tiles, frame])
    msg = wire.recv(b)
    assert msg.kind == "tiles" and msg["seq"] == 7 and msg["grid"] == header["grid"]
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
        (mutate_header(seq=None), "seq must be an integer"),
        (mutate_header(bufs=[{"shape": [2**62, 4], "dtype": "uint8"}])[:1] + [b""], "bad shape/dtype"),
        (mutate_header(bufs=[{"shape": "23", "dtype": "uint8"}]), "bad shape/dtype"),
        (mutate_header(bufs=[{"shape": [2.0, 3], "dtype": "uint8"}]), "bad shape/dtype"),
        (mutate_header(bufs=["x"]), "bad shape/dtype"),
        (mutate_header(v=True), "version"),
        (mutate_header(kind=["frame"]), "unknown message kind"),
        ([b"[" * 100000 + b"]" * 100000], "nested too deeply|not JSON"),
        ([good_parts()[0].replace(b'"seq":0', b'"seq":NaN'), b"\0" * 6], "seq must be an integer"),
        ([good_parts()[0].replace(b'"seq":0', b'"seq":1e999'), b"\0" * 6], "seq must be an integer"),
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


#: the type confusions that crashed the tiler, the alert stage and the supervisor on main, and more:
#: (kind, field, wrong value, the reason it is counted under)
CONFUSED = [
    ("frame", "seq", "7", "frame.seq"),
    ("frame", "t_mono_ns", "12", "frame.t_mono_ns"),
    ("frame", "t_wall_ns", 1.5, "frame.t_wall_ns"),
    ("frame", "cam", ["c"], "frame.cam"),
    ("frame", "cam", "../../etc", "frame.cam"),
    ("frame", "epoch", "1", "frame.epoch"),
    ("frame", "truth", [1], "frame.truth"),
    ("frame", "seq", True, "frame.seq"),
    ("frame", "seq", -1, "frame.seq"),
    ("frame", "seq", 2**64, "frame.seq"),
    ("result", "image_score", "high", "result.image_score"),
    ("result", "image_score", float("nan"), "result.image_score"),
    ("result", "tile_scores", [float("inf")], "result.tile_scores"),
    ("result", "model_ms", float("nan"), "result.model_ms"),
    ("result", "seq", "1", "result.seq"),
    ("result", "cam", {"id": "c"}, "result.cam"),
    ("result", "tile_scores", "0.1", "result.tile_scores"),
    ("result", "tile_scores", [0.1, "x"], "result.tile_scores"),
    ("result", "t_mono_ns", None, "result.t_mono_ns"),
    ("tiles", "grid.coords", [["0", 0]] * 6, "tiles.grid"),
    ("tiles", "grid.coords", [[0, 0]] * 5, "tiles.grid"),
    ("tiles", "grid.coords", [[0, 10**6]] * 6, "tiles.grid"),
    ("tiles", "grid.tile", 48, "tiles.grid"),
    ("tiles", "grid.scaled_shape", [10**6, 10**6], "tiles.grid"),
    ("tiles", "grid.frame_shape", [64, 95], "tiles.grid"),
    ("tiles", "grid.roi", [0, 0, 97, 64], "tiles.grid"),
    ("tiles", "grid.valid", [1] * 6, "tiles.grid"),
    ("tiles", "grid", [], "tiles.grid"),
    ("tiles", "scale", "1", "tiles.scale"),
    ("result", "worker", ["w"], "result.worker"),
    ("credit", "n", "5", "credit.n"),
    ("credit", "n", 2**40, "credit.n"),
    ("credit", "received", [1], "credit.received"),
    ("heartbeat", "stage", ["alert"], "heartbeat.stage"),
    ("heartbeat", "pid", "1", "heartbeat.pid"),
    ("heartbeat", "stats", "x", "heartbeat.stats"),
    ("heartbeat", "stats", {"captured": "9"}, "heartbeat.stats"),
    ("heartbeat", "stats", {"cameras": {"c": {"inspected": "9"}}}, "heartbeat.stats"),
    ("heartbeat", "stats", {"cameras": {"c": {}}}, "heartbeat.stats"),
    ("heartbeat", "stats", {"captured": float("nan")}, "heartbeat.stats"),
    ("frame", "pos", {"rev": "1"}, "frame.pos"),
    ("frame", "pos", {"ok": 1}, "frame.pos"),
    ("result", "pos", {"circumference_px": "0"}, "result.pos"),
    ("tiles", "pos", [1], "tiles.pos"),
]


@pytest.mark.parametrize("kind, field, value, reason", CONFUSED, ids=[f"{c[0]}.{c[1]}={c[2]!r}"[:60] for c in CONFUSED])
def test_type_confused_fields_are_rejected_by_reason(kind: str, field: str, value: object, reason: str) -> None:
    with pytest.raises(wire.WireError) as ei:
        wire.decode(confused(kind, field, value))
    assert ei.value.reason == reason
    assert field.split(".")[-1] in str(ei.value)


@pytest.mark.parametrize("kind", wire.KINDS)
def test_valid_messages_pass_with_optional_fields(kind: str) -> None:
    header, arrays = valid(kind)
    assert wire.decode(encode_raw(kind, header, arrays)).kind == kind
    if kind in ("frame", "tiles", "result"):
        pos = {"rev": 3, "offset_px": 12.5, "circumference_px": None, "source": "cutline", "ok": True}
        extra = {"pos": pos, "truth": {"defects": []}, "a_field_from_a_newer_sender": [1]}
        assert wire.decode(encode_raw(kind, {**header, **extra}, arrays))["pos"] == pos
        unknown = {**pos, "offset_px": float("nan"), "ok": False, "cutline_px": None}  # for the alert to judge
        assert wire.decode(encode_raw(kind, {**header, "pos": unknown}, arrays))["pos"]["ok"] is False
    if kind == "heartbeat":  # a stage's own figures may be anything JSON holds (never a reason to kill it)
        stats = {**header["stats"], "latency": float("nan"), "store": None, "position": {"ok": False}}
        assert wire.decode(encode_raw(kind, {**header, "stats": stats}, arrays))["stats"]["store"] is None


def test_array_shapes_must_agree() -> None:
    header, (amap, frame) = valid("result")
    with pytest.raises(wire.WireError, match="the map must be float32") as ei:
        wire.decode(encode_raw("result", header, [amap[:, :10], frame]))
    assert ei.value.reason == "result.map"
    with pytest.raises(wire.WireError, match="the map must be float32"):
        wire.decode(encode_raw("result", header, [amap.astype(np.float16), frame]))
    with pytest.raises(wire.WireError, match="the frame must be"):
        wire.decode(encode_raw("frame", valid("frame")[0], [np.zeros((4, 4, 5), np.uint8)]))
    with pytest.raises(wire.WireError, match="the frame must be uint8"):
        wire.decode(encode_raw("frame", valid("frame")[0], [np.zeros((4, 4), np.float32)]))
    header, (tiles, frame) = valid("tiles")
    with pytest.raises(wire.WireError, match="tiles must be uint8"):
        wire.decode(encode_raw("tiles", header, [tiles.astype(np.float32), frame]))
    with pytest.raises(wire.WireError, match="frame_shape"):
        wire.decode(encode_raw("tiles", header, [tiles, frame[:, :50]]))


def receiver_uses(msg: wire.Message) -> None:
    """What the receivers compute from a message's fields (a TypeError or ValueError here would be a
    crash of a stage or of the supervisor)."""
    h = msg.header
    if msg.kind in ("frame", "tiles", "result"):
        {h["cam"]: 1}.get(h["cam"])
        int(h["seq"]) - int(h["t_mono_ns"]) + int(h["t_wall_ns"])
        assert msg.arrays[-1].dtype == np.uint8
    if msg.kind == "tiles":
        grid = TileGrid.from_dict(h["grid"])
        assert len(grid) == len(msg.arrays[0]) and grid.frame_shape == msg.arrays[1].shape[:2]
    if msg.kind == "result":
        float(h["image_score"]) + sum(float(s) for s in h["tile_scores"])
        assert msg.arrays[0].shape == msg.arrays[1].shape[:2]
    if msg.kind == "credit":
        int(h["n"]) - int(h.get("received", 0))
    if msg.kind == "heartbeat":
        st = dict(h["stats"])
        int(st.get("captured", 0)) + int(st.get("dropped", 0))
        for cs in st.get("cameras", {}).values():
            int(cs["inspected"]) + int(cs.get("events", 0))


def test_fuzzed_messages_decode_or_raise_wire_error_only() -> None:
    """A fixed-seed fuzz loop: whatever arrives, decode returns a message whose fields the receivers
    can use, or raises WireError - nothing else."""
    rng = np.random.default_rng(20240611)
    reasons: dict[str, int] = {}
    passed = 0
    for _ in range(3000):
        parts = fuzz_parts(rng)
        try:
            msg = wire.decode(parts)
        except wire.WireError as e:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
            continue
        receiver_uses(msg)
        passed += 1
    assert passed > 50 and sum(reasons.values()) > 2000  # both paths well exercised
    assert all(len(r) < 40 for r in reasons)  # bounded reason keys (stats counters)
