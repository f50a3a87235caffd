"""Each stage as a real process on real ZeroMQ sockets: malformed input - garbage, and well-formed
messages with fields of the wrong type (which crashed the tiler, the alert stage and the capture
stage on main) - is counted by reason and dropped, the stage stays alive and goes on working."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, InferenceConfig, TilingConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams, TileGrid, preprocess
from tests.helpers.hostile import confused
from tests.helpers.models import untrained_checkpoint
from tests.helpers.stages import GARBAGE, StageUnderTest

CAM = CameraConfig(id="c")


def frame_header(seq: int) -> dict:
    return {"cam": "c", "seq": seq, "epoch": 1, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns()}


def test_tiler_survives_garbage_and_tiles_frames(tmp_path: Path) -> None:
    pre = PreprocessConfig(PreprocessParams(tile=32, stride=32)).to_dict()
    cam = CameraConfig(id="c", roi=(0, 0, 96, 64))
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.tiler", "tiler",
                        frames_endpoint=f"ipc://{tmp_path}/f.sock", tiles_endpoint=f"ipc://{tmp_path}/t.sock",
                        preprocess=pre, cameras=[cam], tiling=TilingConfig())
    try:
        cap = st.socket(zmq.DEALER, f"ipc://{tmp_path}/f.sock", bind=False)  # plays a capture process
        worker = st.socket(zmq.DEALER, f"ipc://{tmp_path}/t.sock", bind=False)  # plays an inference worker
        for parts in GARBAGE:
            cap.send_multipart(parts)
        wire.send(cap, "credit", {"n": 0})  # hello
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"  # the tiler grants one frame
        # type confusion: each of these crashed the tiler on main
        bad_frames = [confused("frame", "cam", ["c"]), confused("frame", "seq", "7"),
                      confused("frame", "t_mono_ns", "soon"), confused("result", "seq", 1)]
        bad_credits = [confused("credit", "n", "5"), confused("credit", "received", [1]),
                       confused("credit", "n", None), confused("frame", "seq", 1)]
        for parts in bad_frames:
            cap.send_multipart(parts)
        for parts in bad_credits:
            worker.send_multipart(parts)
        n_bad = len(GARBAGE) + len(bad_frames) + len(bad_credits)
        stats = st.wait_stats(lambda s: s.get("bad_messages", 0) == n_bad)
        assert stats["bad_message_reasons"] == {
            "json": 1, "version": 1, "frame.bufs": 1, "kind": 1, "frame.cam": 1, "frame.seq": 1,
            "frame.t_mono_ns": 1, "unexpected.result": 1, "credit.n": 2, "credit.received": 1,
            "unexpected.frame": 1}
        wire.send(cap, "frame", {**frame_header(0), "cam": "other"}, [np.zeros((64, 64), np.uint8)])
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"  # dropped, credit back
        wire.send(cap, "frame", frame_header(1), [np.zeros((32, 32), np.uint8)])  # smaller than the ROI
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"
        frame = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
        wire.send(cap, "frame", frame_header(2), [frame])
        assert not worker.poll(500), "tiles sent to a worker that gave no credit"
        assert not cap.poll(300), "a new credit before the frame was handed on"
        wire.send(cap, "frame", frame_header(99), [frame])  # no credit for it: not taken
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
        assert stats["unknown_camera"] == 1 and stats["bad_frames"] == 1 and stats["bad_messages"] == n_bad
        assert stats["unrequested_frames"] == 1 and stats["waiting_frames"] == 1
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
        # type confusion: each of these crashed the alert stage on main
        bad = [confused("result", "seq", "seven"), confused("result", "image_score", "high"),
               confused("result", "cam", ["c"]), confused("result", "t_mono_ns", "x"),
               confused("result", "tile_scores", "x"), confused("credit", "n", 1)]
        for parts in bad:
            push.send_multipart(parts)
        stats = st.wait_stats(lambda s: s.get("bad_messages", 0) == len(GARBAGE) + len(bad))
        assert {"result.seq", "result.image_score", "result.cam", "result.t_mono_ns", "result.tile_scores",
                "unexpected.credit"} <= set(stats["bad_message_reasons"])
        assert stats.get("inspected", 0) == 0
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
        bad = [*GARBAGE, confused("tiles", "seq", "5"), confused("tiles", "grid.coords", [["0", 0]] * 6),
               confused("tiles", "grid.scaled_shape", [10**6, 10**6]), confused("frame", "seq", 1),
               confused("tiles", "seq", 1)]  # the last: well-formed, but 32-px tiles for a 48-px model
        for parts in bad:
            tiler.send_multipart([peer, *parts])
        frame = np.random.default_rng(1).integers(0, 255, (48, 96), dtype=np.uint8)
        tiles, grid = preprocess(frame, PreprocessParams(tile=48, stride=48))
        bad_grid = {**grid.to_dict(), "coords": [[0, 0]]}  # says 1 tile, carries 2
        head = {**frame_header(5), "grid": bad_grid}
        wire.send_routed(tiler, peer, "tiles", head, [tiles, frame])
        stats = st.wait_stats(lambda s: s.get("bad_messages", 0) == len(bad) + 1)
        assert {"tiles.seq": 1, "tiles.grid": 3, "unexpected.frame": 1, "tiles.model": 1}.items() <= (
            stats["bad_message_reasons"].items())
        wire.send_routed(tiler, peer, "tiles", {**frame_header(6), "grid": grid.to_dict()}, [tiles, frame])
        assert results.poll(60000), "no result came out"
        res = wire.recv(results)
        assert res.kind == "result" and res["seq"] == 6 and len(res["tile_scores"]) == 2
        assert res.arrays[0].shape == frame.shape and res.arrays[0].dtype == np.float32
        np.testing.assert_array_equal(res.arrays[1], frame)
        stats = st.wait_stats(lambda s: s.get("frames") == 1)
        assert stats["bad_messages"] == len(bad) + 1 and stats["ready"]
    finally:
        assert st.stop() == 0


def test_infer_splits_a_large_frame_into_batches(tmp_path: Path) -> None:
    """A frame of more tiles than max_batch_tiles runs in several forward passes (on main one frame was
    one batch whatever its size: a 2048x4096 frame made a 2016-tile batch and the worker went silent
    until the supervisor killed it); the stitched result is the same as from one pass."""
    from knitwatch.pipeline.detector import load_detector

    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    tiler = zmq.Context.instance().socket(zmq.ROUTER)  # plays the tiler
    tiler.bind(f"ipc://{tmp_path}/t.sock")
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.infer", "infer.0",
                        tiles_endpoint=f"ipc://{tmp_path}/t.sock", results_endpoint=f"ipc://{tmp_path}/r.sock",
                        checkpoint=str(ckpt),
                        inference=InferenceConfig(device="cpu", backend="torch", max_batch_tiles=2, max_wait_ms=0))
    st.sockets.append(tiler)
    try:
        results = st.socket(zmq.PULL, f"ipc://{tmp_path}/r.sock", bind=True)
        assert tiler.poll(120000), "the worker never asked for tiles"
        peer, credit = wire.recv_routed(tiler)
        assert credit.kind == "credit" and credit["n"] == 2
        frames = [np.random.default_rng(i).integers(0, 255, (96, 144), dtype=np.uint8) for i in (2, 3)]
        for seq, frame in enumerate(frames):  # 6 tiles each, 3 times the batch limit
            tiles, grid = preprocess(frame, PreprocessParams(tile=48, stride=48))
            wire.send_routed(tiler, peer, "tiles", {**frame_header(seq), "grid": grid.to_dict()}, [tiles, frame])
        got = []
        for _ in frames:
            assert results.poll(60000), "no result came out"
            got.append(wire.recv(results))
        stats = st.wait_stats(lambda s: s.get("frames") == 2)
        assert stats["batch_tiles_hist"] == {"2": 6} and stats["batches"] == 6 and stats["tiles"] == 12
    finally:
        assert st.stop() == 0
    det = load_detector(str(ckpt), "cpu", "torch")
    for res, frame in zip(sorted(got, key=lambda m: m["seq"]), frames, strict=True):
        tiles, _ = preprocess(frame, PreprocessParams(tile=48, stride=48))
        _, scores = det.predict(tiles)  # all 6 tiles in one pass
        assert res["batch_tiles"] == 2
        np.testing.assert_allclose(res["tile_scores"], scores, rtol=1e-4, atol=1e-5)
        assert res.arrays[0].shape == frame.shape


def test_capture_survives_garbage_and_sends_against_credit(tmp_path: Path) -> None:
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((32, 48), 40 * (i + 1), np.uint8))
    (folder / "1.png").write_bytes(b"not a png")  # unreadable: on main the replay restarted at 0.png forever
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
        bad = [*GARBAGE, confused("credit", "n", "1"), confused("credit", "n", [1]), confused("frame", "seq", 0)]
        for parts in bad:
            tiler.send_multipart([peer, *parts])
        stats = st.wait_stats(lambda s: s.get("bad_messages", 0) == len(bad) and s.get("dropped", 0) >= 5)
        assert stats["bad_message_reasons"]["credit.n"] == 2 and stats["bad_message_reasons"]["unexpected.frame"] == 1
        assert stats["bad_files"] >= 1 and stats.get("read_errors", 0) == 0
        wire.send_routed(tiler, peer, "credit", {"n": 1})
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not got:
            if tiler.poll(500):
                _, msg = wire.recv_routed(tiler)
                if msg.kind == "frame":
                    got.append(msg)
        assert got and got[0]["cam"] == "c" and got[0].arrays[0].shape == (32, 48)
        values = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and values != {40, 120}:  # the files after the bad one are read
            wire.send_routed(tiler, peer, "credit", {"n": 1})
            while tiler.poll(300):
                _, msg = wire.recv_routed(tiler)
                if msg.kind == "frame":
                    values.add(int(msg.arrays[0][0, 0]))
                    break
        assert values == {40, 120}
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline:  # one credit, one frame: hellos only from now on
            if tiler.poll(100):
                assert wire.recv_routed(tiler)[1].kind == "credit"
        stats = st.wait_stats(lambda s: s.get("sent", 0) >= 3)
        assert stats["captured"] - stats["sent"] - stats["dropped"] in (0, 1)  # at most the newest one waits
        assert stats["bad_files"] == 1 and stats.get("read_errors", 0) == 0
    finally:
        assert st.stop() == 0


def test_fabric_position_travels_from_capture_to_the_alert_stage(tmp_path: Path) -> None:
    """capture (the simulator, the image position estimator) -> tiler -> infer, real processes: every
    result the alert stage receives carries the frame's "pos" next to the simulator's truth, and the
    capture stage reports the estimator in its stats."""
    from knitwatch.config.settings import SimulatorConfig

    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    pre = PreprocessConfig(PreprocessParams(tile=48, stride=48)).to_dict()
    cam = CameraConfig(id="c", source="simulator", fps=20.0, width=96, height=48,
                       simulator=SimulatorConfig(speed_px=8.0, revolution_frames=40, seed=1))
    ep = {k: f"ipc://{tmp_path}/{k}.sock" for k in ("frames", "tiles", "results")}
    for d in ("capture", "tiler", "infer"):
        (tmp_path / d).mkdir()
    stages = [
        StageUnderTest(tmp_path / "infer", "knitwatch.pipeline.stages.infer", "infer.0", tiles_endpoint=ep["tiles"],
                       results_endpoint=ep["results"], checkpoint=str(ckpt),
                       inference=InferenceConfig(device="cpu", max_batch_tiles=8, max_wait_ms=10)),
        StageUnderTest(tmp_path / "tiler", "knitwatch.pipeline.stages.tiler", "tiler", frames_endpoint=ep["frames"],
                       tiles_endpoint=ep["tiles"], preprocess=pre, cameras=[cam], tiling=TilingConfig()),
        StageUnderTest(tmp_path / "capture", "knitwatch.pipeline.stages.capture", "capture.c", camera=cam,
                       frames_endpoint=ep["frames"]),
    ]
    try:
        alert = stages[0].socket(zmq.PULL, ep["results"], bind=True)  # plays the alert stage
        results = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(results) < 6:
            if alert.poll(500):
                results.append(wire.recv(alert))
        assert len(results) == 6, "results did not come through"
        for res in results:  # the estimate is the truth's (the frame's tube column 0: revolution and offset)
            pos, truth = res["pos"], res["truth"]
            assert pos["source"] == "image" and pos["ok"], pos
            true_px = truth["revolution"] * truth["circumference_px"] + truth["offset_px"]
            if pos["circumference_px"] is None:  # the cutline did not come by twice yet: distance since frame 0
                assert abs(pos["offset_px"] - true_px) < 1.0, (pos, truth)
            else:
                turns = pos["rev"] + pos["offset_px"] / pos["circumference_px"]
                assert abs(turns - true_px / truth["circumference_px"]) * 320 < 1.0, (pos, truth)
        stats = stages[2].wait_stats(lambda s: s.get("position", {}).get("frames", 0) >= 6)
        assert stats["position"]["source"] == "image" and stats["position"]["lost"] == 0
        assert stats["position"]["ms_p50"] > 0
    finally:
        for st in reversed(stages):
            assert st.stop() == 0
