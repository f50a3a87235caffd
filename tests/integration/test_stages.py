"""Each stage as a real process on real ZeroMQ sockets: malformed input is counted and dropped, the
stage stays alive and goes on working."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, InferenceConfig, TilingConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams, TileGrid, preprocess
from tests.helpers.stages import GARBAGE, StageUnderTest

CAM = CameraConfig(id="c")


def frame_header(seq: int) -> dict:
    return {"cam": "c", "seq": seq, "epoch": 1, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns()}


def test_tiler_survives_garbage_and_tiles_frames(tmp_path: Path) -> None:
    pre = PreprocessConfig(PreprocessParams(tile=32, stride=32)).to_dict()
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.tiler", "tiler",
                        frames_endpoint=f"ipc://{tmp_path}/f.sock", tiles_endpoint=f"ipc://{tmp_path}/t.sock",
                        preprocess=pre, cameras=[CAM], tiling=TilingConfig())
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
    alert = AlertConfig(confirm_k=2, confirm_n=3, min_area_px=4, cooldown_frames=10, decisions_log=decisions)
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.alert", "alert",
                        results_endpoint=f"ipc://{tmp_path}/r.sock", thresholds={"image": 1.0, "pixel": 0.5},
                        alert=alert, cameras=[CAM])
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


def untrained_checkpoint(path: Path, tile: int = 48) -> Path:
    """A real EfficientAD-S checkpoint with untrained weights and set thresholds (transport tests only)."""
    import torch

    from knitwatch.models.base import save_model
    from knitwatch.models.efficientad.model import EfficientAD

    torch.manual_seed(0)
    model = EfficientAD(size="s", tile_size=tile)
    model.image_threshold.fill_(1e9)
    model.pixel_threshold.fill_(1e9)
    pre = PreprocessConfig(PreprocessParams(tile=tile, stride=tile)).to_dict()
    return save_model(path, model, preprocess=pre, provenance={"id": "untrained"})


def test_infer_survives_garbage_and_answers(tmp_path: Path) -> None:
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    tiler = zmq.Context.instance().socket(zmq.ROUTER)  # plays the tiler
    tiler.bind(f"ipc://{tmp_path}/t.sock")
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.infer", "infer.0",
                        tiles_endpoint=f"ipc://{tmp_path}/t.sock", results_endpoint=f"ipc://{tmp_path}/r.sock",
                        checkpoint=str(ckpt),
                        inference=InferenceConfig(device="cpu", max_batch_tiles=8, max_wait_ms=10))
    st.sockets.append(tiler)
    try:
        results = st.socket(zmq.PULL, f"ipc://{tmp_path}/r.sock", bind=True)
        assert tiler.poll(120000), "the worker never asked for tiles"
        peer, credit = wire.recv_routed(tiler)
        assert credit.kind == "credit" and credit["n"] == 8 and credit["received"] == 0
        for parts in GARBAGE:
            tiler.send_multipart([peer, *parts])
        frame = np.random.default_rng(1).integers(0, 255, (48, 96), dtype=np.uint8)
        tiles, grid = preprocess(frame, PreprocessParams(tile=48, stride=48))
        bad_grid = {**grid.to_dict(), "coords": [[0, 0]]}  # says 1 tile, carries 2
        head = {**frame_header(5), "grid": bad_grid}
        wire.send_routed(tiler, peer, "tiles", head, [tiles, frame])
        st.wait_stats(lambda s: s.get("bad_messages", 0) == len(GARBAGE) + 1)
        wire.send_routed(tiler, peer, "tiles", {**frame_header(6), "grid": grid.to_dict()}, [tiles, frame])
        assert results.poll(60000), "no result came out"
        res = wire.recv(results)
        assert res.kind == "result" and res["seq"] == 6 and len(res["tile_scores"]) == 2
        assert res.arrays[0].shape == frame.shape and res.arrays[0].dtype == np.float32
        np.testing.assert_array_equal(res.arrays[1], frame)
        stats = st.wait_stats(lambda s: s.get("frames") == 1)
        assert stats["bad_messages"] == len(GARBAGE) + 1 and stats["ready"]
    finally:
        assert st.stop() == 0


def test_capture_survives_garbage_and_sends_against_credit(tmp_path: Path) -> None:
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((32, 48), 40 * (i + 1), np.uint8))
    tiler = zmq.Context.instance().socket(zmq.ROUTER)  # plays the tiler
    tiler.bind(f"ipc://{tmp_path}/f.sock")
    cam = CameraConfig(id="c", source="folder", uri=str(folder), fps=20.0, loop=True)
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.capture", "capture.c", camera=cam,
                        frames_endpoint=f"ipc://{tmp_path}/f.sock")
    st.sockets.append(tiler)
    try:
        assert tiler.poll(30000)
        peer, hello = wire.recv_routed(tiler)
        assert hello.kind == "credit" and hello["n"] == 0  # no frame without a credit
        for parts in GARBAGE:
            tiler.send_multipart([peer, *parts])
        st.wait_stats(lambda s: s.get("bad_messages", 0) == len(GARBAGE) and s.get("dropped", 0) >= 5)
        wire.send_routed(tiler, peer, "credit", {"n": 1})
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not got:
            if tiler.poll(500):
                _, msg = wire.recv_routed(tiler)
                if msg.kind == "frame":
                    got.append(msg)
        assert got and got[0]["cam"] == "c" and got[0].arrays[0].shape == (32, 48)
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline:  # one credit, one frame: hellos only from now on
            if tiler.poll(100):
                assert wire.recv_routed(tiler)[1].kind == "credit"
        stats = st.wait_stats(lambda s: s.get("sent") == 1)
        assert stats["captured"] - stats["sent"] - stats["dropped"] in (0, 1)  # at most the newest one waits
    finally:
        assert st.stop() == 0
