"""Each stage as a real process on real ZeroMQ sockets: malformed input is counted and dropped, the
stage stays alive and goes on working."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams, TileGrid
from tests.stage_harness import GARBAGE, StageUnderTest

CAM = {"id": "c", "roi": None, "pixel_threshold": None}


def frame_header(seq: int) -> dict:
    return {"cam": "c", "seq": seq, "epoch": 1, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns()}


def test_tiler_survives_garbage_and_tiles_frames(tmp_path: Path) -> None:
    pre = PreprocessConfig(PreprocessParams(tile=32, stride=32)).to_dict()
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.tiler", "tiler",
                        frames_endpoint=f"ipc://{tmp_path}/f.sock", tiles_endpoint=f"ipc://{tmp_path}/t.sock",
                        preprocess=pre, cameras=[CAM])
    try:
        cap = st.socket(zmq.DEALER, f"ipc://{tmp_path}/f.sock", bind=False)  # plays a capture process
        worker = st.socket(zmq.DEALER, f"ipc://{tmp_path}/t.sock", bind=False)  # plays an inference worker
        for parts in GARBAGE:
            cap.send_multipart(parts)
        st.wait_stats(lambda s: s.get("bad_messages", 0) == len(GARBAGE))
        wire.send(cap, "credit", {"n": 0})  # hello
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"  # the tiler grants one frame
        wire.send(cap, "frame", {**frame_header(0), "cam": "other"}, [np.zeros((64, 64), np.uint8)])
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"  # dropped, credit back
        wire.send(cap, "frame", frame_header(1), [np.zeros((64, 64, 5), np.uint8)])  # 5 channels: cannot tile
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"
        frame = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
        wire.send(cap, "frame", frame_header(2), [frame])
        assert not worker.poll(500), "tiles sent to a worker that gave no credit"
        assert not cap.poll(300), "a new credit before the frame was handed on"
        wire.send(worker, "credit", {"n": 6, "received": 0})
        assert worker.poll(10000), "no tiles came out"
        msg = wire.recv(worker)
        assert msg.kind == "tiles" and msg["seq"] == 2 and msg["cam"] == "c"
        grid = TileGrid.from_dict(msg["grid"])
        assert msg.arrays[0].shape == (6, 32, 32) and len(grid) == 6
        np.testing.assert_array_equal(msg.arrays[1], frame)
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"  # handed on: the camera may send again
        wire.send(cap, "frame", frame_header(3), [frame])
        assert not worker.poll(500), "the worker's room (6 tiles) was used up"
        stats = st.wait_stats(lambda s: s.get("frames") == 2)
        assert stats["unknown_camera"] == 1 and stats["bad_frames"] == 1 and stats["bad_messages"] == len(GARBAGE)
        assert stats["waiting_frames"] == 1
    finally:
        assert st.stop() == 0


def test_alert_survives_garbage_and_decides(tmp_path: Path) -> None:
    decisions = tmp_path / "decisions.jsonl"
    alert = {"confirm_k": 2, "confirm_n": 3, "min_area_px": 4, "cooldown_frames": 10,
             "image_threshold": None, "pixel_threshold": None}
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.alert", "alert",
                        results_endpoint=f"ipc://{tmp_path}/r.sock", thresholds={"image": 1.0, "pixel": 0.5},
                        alert=alert, cameras=[CAM], decisions_path=str(decisions))
    try:
        push = st.socket(zmq.PUSH, f"ipc://{tmp_path}/r.sock", bind=False)
        for parts in GARBAGE:
            push.send_multipart(parts)
        st.wait_stats(lambda s: s.get("bad_messages", 0) == len(GARBAGE))
        frame = np.zeros((40, 40), np.uint8)
        for seq in range(4):
            amap = np.zeros((40, 40), np.float32)
            if seq >= 1:
                amap[10:20, 10:20] = 2.0
            head = {**frame_header(seq), "image_score": float(amap.max()), "tile_scores": [float(amap.max())]}
            wire.send(push, "result", head, [amap, frame])
        stats = st.wait_stats(lambda s: s.get("inspected") == 4)
        assert stats["cameras"]["c"]["defect_frames"] == 3
        assert stats["cameras"]["c"]["events"] == 1  # confirmed at frame 2, cool-down covers frame 3
    finally:
        assert st.stop() == 0
    rows = [__import__("json").loads(line) for line in decisions.read_text().splitlines()]
    assert [(r["seq"], r["defect"], r["confirmed"], r["event"]) for r in rows] == [
        (0, False, False, False), (1, True, False, False), (2, True, True, True), (3, True, True, False)]
    assert rows[2]["regions"][0]["bbox"] == [10, 10, 20, 20]
