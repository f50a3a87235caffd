"""Every ZeroMQ socket of a stage takes no message part larger than the frames its settings allow (ZeroMQ
``MAXMSGSIZE``): a peer that sends a huge message is disconnected before the stage allocates it; the
stage stays alive, counts the dropped link, and goes on working for the peers that behave."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from knitwatch.config.settings import CameraConfig, TilingConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams
from knitwatch.pipeline.stages.common import MIN_MESSAGE_BYTES, max_message_bytes
from tests.helpers.stages import StageUnderTest


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def frame_header(seq: int) -> dict:
    return {"cam": "c", "seq": seq, "epoch": 1, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns()}


def test_limit_follows_the_largest_camera() -> None:
    small = [CameraConfig(id="a", width=128, height=64)]
    assert max_message_bytes(small) == MIN_MESSAGE_BYTES
    big = [CameraConfig(id="a", width=640, height=480), CameraConfig(id="b", width=4096, height=2048)]
    assert max_message_bytes(big) == 64 * 4096 * 2048  # room for the frame, its float32 map, its tiles


def test_oversized_message_drops_the_link_not_the_stage(tmp_path: Path) -> None:
    pre = PreprocessConfig(PreprocessParams(tile=32, stride=32)).to_dict()
    cam = CameraConfig(id="c", width=96, height=64)  # the limit: 16 MiB
    fep, tep = f"ipc://{tmp_path}/f.sock", f"ipc://{tmp_path}/t.sock"
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.tiler", "tiler", frames_endpoint=fep,
                        tiles_endpoint=tep, preprocess=pre, cameras=[cam], tiling=TilingConfig())
    try:
        st.wait_stats(lambda s: True)
        before = rss_bytes(st.proc.pid)
        rogue = st.socket(zmq.DEALER, fep, bind=False)
        huge = np.zeros((8192, 8192), np.uint8)  # a 64 MiB "frame": 4 x the limit
        wire.send(rogue, "frame", frame_header(0), [huge])
        stats = st.wait_stats(lambda s: s.get("links_dropped", 0) >= 1)
        assert stats.get("frames", 0) == 0 and stats.get("bad_messages", 0) == 0
        assert rss_bytes(st.proc.pid) - before < huge.nbytes // 2, "the stage allocated the oversized message"
        assert st.proc.is_alive()
        # a camera that behaves is served as before
        cap = st.socket(zmq.DEALER, fep, bind=False)
        worker = st.socket(zmq.DEALER, tep, bind=False)
        wire.send(cap, "credit", {"n": 0})
        assert cap.poll(10000) and wire.recv(cap).kind == "credit"
        frame = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
        wire.send(cap, "frame", frame_header(1), [frame])
        wire.send(worker, "credit", {"n": 6, "received": 0})
        assert worker.poll(10000), "no tiles came out after the rogue peer was dropped"
        msg = wire.recv(worker)
        assert msg.kind == "tiles" and msg["seq"] == 1
        stats = st.wait_stats(lambda s: s.get("frames") == 1)
        assert stats["links_dropped"] >= 1
    finally:
        assert st.stop() == 0
