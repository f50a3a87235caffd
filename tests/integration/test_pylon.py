"""Industrial cameras against Basler's pylon camera emulator, for real (pypylon's wheel carries it:
``PYLON_CAMEMU=N`` makes N emulated cameras, serials 0815-0000 ...): settings written and read back,
the errors that name camera and setting, triggers, Bayer conversion, SDK counters, a removed camera
reconnected and counted by the capture stage, the CLI, and the whole daemon stopping the machine for a
hole in simulated fabric that the emulator streams from a folder.

The ``genicam`` (harvesters) source needs a GenTL producer (.cti). pypylon's wheel ships none (its
``libpylon_TL_*.so`` are pylon's own transport layers, not GenTL producers), so its test runs only when
GenTL's standard ``GENICAM_GENTL64_PATH`` holds one, and is skipped with that reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from knitwatch.config.settings import CameraConfig
from knitwatch.pipeline.sources.base import SourceError
from knitwatch.pipeline.sources.genicam import CameraSettingError

pylon = pytest.importorskip("pypylon.pylon", reason="pypylon is not installed (pip install 'knitwatch[cameras]')")

from knitwatch.pipeline.sources.pylon import PylonSource  # noqa: E402

EMU0, EMU1 = "0815-0000", "0815-0001"


@pytest.fixture(autouse=True)
def _emulated_cameras(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two emulated cameras (pylon reads the variable at each enumeration; spawned stages inherit it)."""
    monkeypatch.setenv("PYLON_CAMEMU", "2")


def pylon_cam(**industrial: object) -> CameraConfig:
    fps = float(industrial.pop("fps", 50.0))  # type: ignore[arg-type]
    return CameraConfig(id="knit1", source="pylon", fps=fps, industrial={"device": EMU0, **industrial})  # type: ignore[arg-type]


def opened(cam: CameraConfig) -> PylonSource:
    src = PylonSource(cam)
    src.open()
    return src


def first_frame(src: PylonSource, timeout: float = 5.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        img = src.read()
        if img is not None:
            return img
    raise AssertionError("no frame")


def test_settings_are_written_and_read_back() -> None:
    cam = pylon_cam(width=320, height=240, offset_x=64, offset_y=32, exposure_us=2500, gain_db=6.0,
                    packet_size=8192, inter_packet_delay=1000, fps=40.0)
    src = opened(cam)
    try:
        got = src.settings
        assert (got["width"], got["height"], got["offset_x"], got["offset_y"]) == (320, 240, 64, 32)
        assert got["exposure_us"] == pytest.approx(2500) and got["gain_db"] == pytest.approx(6.0, abs=0.1)
        assert got["packet_size"] == 8192 and got["inter_packet_delay"] == 1000
        assert got["trigger"] == "free_run" and got["frame_rate"] == pytest.approx(40.0)
        f = src.features  # the camera itself, not the source's copy
        assert f is not None and f.get("Width") == 320 and f.get("OffsetY") == 32 and f.get("TriggerMode") == "Off"
        assert f.get("ExposureAuto") == "Off" and f.get("AcquisitionFrameRateEnable") is True
        img = first_frame(src)
        assert img.shape == (240, 320) and img.dtype == np.uint8  # the sensor ROI, Mono8
        info = src.stats()
        assert (info["model"], info["serial"], info["interface"]) == ("Emulation", EMU0, "BaslerCamEmu")
    finally:
        src.close()


def test_hardware_line_trigger_waits_and_software_trigger_makes_one_frame_a_read() -> None:
    src = opened(pylon_cam(trigger="line", trigger_line="Line2", trigger_edge="falling", trigger_delay_us=150,
                           frame_timeout_ms=150))
    try:
        got = src.settings
        assert (got["trigger"], got["trigger_source"], got["trigger_edge"]) == ("line", "Line2", "FallingEdge")
        assert got["trigger_delay_us"] == pytest.approx(150) and got["frame_rate"] is None
        assert src.live  # the line sets the pace
        t0 = time.monotonic()
        assert src.read() is None and src.read() is None  # no edge on the line: no frame, within the timeout
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert src.stats()["timeouts"] == 2 and src.stats()["grabbed"] == 0
    finally:
        src.close()
    src = opened(pylon_cam(trigger="software"))
    try:
        assert not src.live  # the capture stage paces the reads; each read triggers one frame
        for _ in range(4):
            assert src.read() is not None
        st = src.stats()
        assert st["triggers"] == st["grabbed"] == 4 and st["lost"] == 0
    finally:
        src.close()


@pytest.mark.parametrize(("industrial", "message"), [
    ({"device": "0815-9999"}, "camera knit1: industrial.device '0815-9999': no camera with this serial number or user "
                              "id (pylon sees: Emulation 0815-0000, Emulation 0815-0001)"),
    ({"device": ""}, "industrial.device is empty, so exactly one camera must be found"),
    ({"exposure_us": 5e7}, "camera knit1 (Emulation 0815-0000): industrial.exposure_us = 5e+07 is outside the "
                           "camera's range 1 .. 1e+07 (ExposureTime)"),
    ({"width": 5000}, "industrial.width = 5000 is outside the camera's range 1 .. 4096 (Width)"),
    ({"trigger": "line", "trigger_line": "Line7"}, "industrial.trigger_line = 'Line7' is not offered by the camera "
                                                   "(TriggerSource: Software, Line1, Line2, Line3"),
    ({"inter_packet_delay": 900000}, "industrial.inter_packet_delay = 900000 is outside the camera's range 0 .. "),
    ({"emulator_images": "/nonexistent/folder"}, "industrial.emulator_images /nonexistent/folder is not a folder"),
])
def test_bad_settings_name_the_camera_and_the_setting(industrial: dict, message: str) -> None:
    src = PylonSource(pylon_cam(**industrial))
    with pytest.raises(CameraSettingError) as e:
        src.open()
    assert message in str(e.value)
    src.close()
    ok = opened(pylon_cam())  # the failed open left the camera free
    ok.close()


@pytest.mark.parametrize("pattern", ["BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8", "RGB8", "BGR8"])
def test_colour_frames_are_converted_to_bgr(tmp_path: Path, pattern: str) -> None:
    """The emulator streams a picture that is red on the left and blue on the right in the camera's
    pixel format; the source hands the pipeline BGR with red and blue where they were."""
    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:, :48] = (0, 0, 255)
    picture[:, 48:] = (255, 0, 0)
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), picture)
    src = opened(pylon_cam(pixel_format=pattern, emulator_images=str(tmp_path / "imgs")))
    try:
        img = first_frame(src)
    finally:
        src.close()
    assert img.shape == (64, 96, 3)
    left, right = img[8:56, 8:40].reshape(-1, 3).mean(0), img[8:56, 56:88].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(left, [0, 0, 255], atol=8)
    np.testing.assert_allclose(right, [255, 0, 0], atol=8)


def test_incomplete_frames_are_skipped_and_counted() -> None:
    src = opened(pylon_cam())
    try:
        first_frame(src)
        f = src.features
        assert f is not None
        f.set("ForceFailedBufferCount", 3)  # the emulator marks the next 3 buffers as failed
        f.execute("ForceFailedBuffer")
        for _ in range(5):
            assert src.read() is not None  # a failed buffer is skipped within the same read
        st = src.stats()
        assert st["incomplete"] == 3 and st["sdk_counters"]["failed_buffers"] == 3
        assert st["grabbed"] == 6 and st["sdk_counters"]["buffers"] >= 9
    finally:
        src.close()


def test_a_removed_camera_is_reconnected_and_counted_by_the_capture_stage(tmp_path: Path) -> None:
    """A real capture stage (in this process, so that the test can reach the emulated device) grabs from
    the emulator; the emulator's device-removal notice (FirePnPCallbackValue: pylon then reports the
    camera as removed, as after an unplug) -> the read fails, the stage closes the camera, reopens it
    after its back-off, counts the reconnect, and frames flow again."""
    from knitwatch.pipeline.stages.capture import CaptureStage

    ctx = zmq.Context()
    control = ctx.socket(zmq.PULL)
    control.bind(f"ipc://{tmp_path}/control.sock")
    frames = ctx.socket(zmq.ROUTER)
    frames.bind(f"ipc://{tmp_path}/frames.sock")
    src = PylonSource(pylon_cam(fps=30.0))
    stage = CaptureStage("capture.knit1", f"ipc://{tmp_path}/control.sock", camera=src.cam,
                         frames_endpoint=f"ipc://{tmp_path}/frames.sock", source=src)
    stage.backoff = 0.2

    def run_until(pred: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stage.step()
            if pred():  # type: ignore[operator]
                return
        raise AssertionError(f"not reached; counters {dict(stage.counters)}, camera {src.stats()}")

    try:
        run_until(lambda: stage.counters["captured"] >= 5)
        assert src.features is not None
        src.features.set("FirePnPCallbackValue", 1)  # the device-removal notice
        run_until(lambda: stage.counters["reconnects"] == 1)
        at_reconnect = stage.counters["captured"]
        run_until(lambda: stage.counters["captured"] >= at_reconnect + 5)
        assert stage.counters["read_errors"] == 1
        info = stage.stats()["camera_info"]
        assert info["disconnects"] == 1 and info["serial"] == EMU0
        assert info["grabbed"] == stage.counters["captured"]
        assert src.settings["frame_rate"] == pytest.approx(30.0)  # settings written again after the reconnect
    finally:
        stage.on_stop()
        stage.links.close()
        stage.zctx.destroy(linger=0)  # term() after closing the stage's sockets waits forever in-process
        control.close(0)
        frames.close(0)
        ctx.term()


def knitwatch(capsys: pytest.CaptureFixture[str], *args: str, config: Path | None = None) -> tuple[int, str, str]:
    """``knitwatch ARGS`` in this process (a subprocess pays seconds of start-up per call): exit code, out, err."""
    from knitwatch.daemon.cli.main import main

    capsys.readouterr()
    code = main(["--log-level", "WARNING", *args] + (["--config", str(config)] if config else []))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_snaps_checks_and_benches_cameras(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[[cameras]]\nid = "knit1"\nsource = "pylon"\nfps = 20\n[cameras.industrial]\ndevice = "{EMU1}"\n'
                   'width = 200\nheight = 100\nexposure_us = 3000\n'
                   f'[store]\npath = "{tmp_path / "store"}"\n')
    code, out, err = knitwatch(capsys, "cameras", "list", "--json", config=cfg)
    assert code == 0, err
    listed = json.loads(out)["cameras"]
    assert [(c["serial"], c["model"], c["interface"]) for c in listed] == [
        (EMU0, "Emulation", "BaslerCamEmu"), (EMU1, "Emulation", "BaslerCamEmu")]

    code, out, err = knitwatch(capsys, "cameras", "snap", "knit1", "--out", str(tmp_path / "f.png"), config=cfg)
    assert code == 0, err
    assert cv2.imread(str(tmp_path / "f.png"), cv2.IMREAD_UNCHANGED).shape == (100, 200)  # the configured ROI
    assert "exposure_us        3000.0" in out
    code, out, err = knitwatch(capsys, "cameras", "snap", EMU0, "--out", str(tmp_path / "g.png"), config=cfg)
    assert code == 0, err  # by serial number: the camera's own settings
    assert cv2.imread(str(tmp_path / "g.png"), cv2.IMREAD_UNCHANGED).shape == (1040, 1024)

    code, out, err = knitwatch(capsys, "cameras", "check", "--json", config=cfg)
    assert code == 0, err
    checked = json.loads(out)
    assert checked[0]["ok"] and checked[0]["settings"]["width"] == 200 and checked[0]["serial"] == EMU1

    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("exposure_us = 3000", "exposure_us = 2e7"))
    schema = tmp_path / "schema.toml"  # what the schema knows fails before any camera is opened
    schema.write_text(cfg.read_text().replace("exposure_us = 3000", 'pixel_format = "Mono12"'))
    code, out, err = knitwatch(capsys, "config", "check", config=schema)
    assert code == 2 and "cameras.0.industrial.pixel_format" in err, err
    code, out, err = knitwatch(capsys, "cameras", "check", config=bad)
    assert code == 2
    assert "camera knit1 (Emulation 0815-0001): industrial.exposure_us = 2e+07 is outside the camera's range" in out
    code, out, err = knitwatch(capsys, "doctor", "--json", config=bad)
    cams = [c for c in json.loads(out) if c["name"] == "camera knit1"]
    assert cams[0]["status"] == "FAIL" and "industrial.exposure_us = 2e+07" in cams[0]["detail"]
    code, out, err = knitwatch(capsys, "cameras", "snap", "knit1", "--out", str(tmp_path / "h.png"), config=bad)
    assert code == 2 and "industrial.exposure_us" in err and not list(tmp_path.glob("*h.png*"))
    code, out, err = knitwatch(capsys, "cameras", "snap", "knit1", "--out", str(tmp_path / "h.txt"), config=cfg)
    assert code == 2 and "--out" in err

    code, out, err = knitwatch(capsys, "cameras", "bench", EMU0, "--seconds", "1", "--fps", "30", "--json", config=cfg)
    assert code == 0, err
    bench = json.loads(out)
    assert bench["frames"] > 10 and bench["cpu_ms_per_frame"] > 0
    code, out, err = knitwatch(capsys, "cameras", "bench", EMU0, "--fps", "1000", config=cfg)
    assert code == 2 and "--fps 1000" in err


def gentl_producers() -> list[Path]:
    """The .cti files of the folders in GENICAM_GENTL64_PATH (GenTL's standard variable)."""
    dirs = [Path(d) for d in os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep) if d]
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("*.cti"))


@pytest.mark.skipif(not gentl_producers(),
                    reason="no GenTL producer (.cti) in GENICAM_GENTL64_PATH: pypylon's wheel ships none (its "
                    "libpylon_TL_*.so are pylon's own transport layers); a vendor's producer tests harvesters")
def test_genicam_source_grabs_through_a_gentl_producer() -> None:
    from knitwatch.pipeline.sources.genicam import GenICamSource, list_gentl_cameras

    producer = gentl_producers()[0]
    cams = list_gentl_cameras(producer)
    assert cams, f"{producer} sees no camera"
    cam = CameraConfig(id="g", source="genicam",  # type: ignore[arg-type]
                       industrial={"gentl_producer": str(producer), "device": cams[0]["serial"]})
    src = GenICamSource(cam)
    src.open()
    try:
        deadline = time.monotonic() + 10
        img = None
        while img is None and time.monotonic() < deadline:
            img = src.read()
        assert img is not None and img.dtype == np.uint8
        assert src.settings["pixel_format"] == "Mono8"
        assert src.stats()["grabbed"] >= 1
    finally:
        src.close()
    with pytest.raises(SourceError):
        bad = CameraConfig(id="g", source="genicam",  # type: ignore[arg-type]
                           industrial={"gentl_producer": str(producer), "device": "no-such-serial"})
        GenICamSource(bad).open()


# ---------------------------------------------------------------------- the whole daemon on the emulator

W, H, TILE, SPEED, REV, N_FILES = 256, 128, 64, 24.0, 60, 30


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientAD-S on 64 px tiles of defect-free simulated fabric (as tests/e2e/test_daemon.py), other seed."""
    from knitwatch.pipeline.offline.demo import train_simulator_model

    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    return train_simulator_model(path, width=W, height=H, speed_px=SPEED, revolution_frames=REV, tile=TILE,
                                 frames=30, steps=60, distill_steps=30, seed=11, progress=False)


def knit_frames(folder: Path) -> set[int]:
    """The knit simulator's frames (a hole entering at frame 8) as image files; the indices of the files
    that show a large part of the hole."""
    from knitwatch.pipeline.sources.knitsim import FabricSpec, KnitStream, ScheduledDefect

    folder.mkdir()
    stream = KnitStream(W, H, FabricSpec(pitch_px=6.0), seed=3, speed_px=SPEED, fps=4.0, revolution_frames=REV,
                        defects=[ScheduledDefect(kind="hole", frame=8, size=3.0)])
    with_hole = set()
    for i in range(N_FILES):
        img, truth = stream.frame(i)
        cv2.imwrite(str(folder / f"f{i:03d}.png"), img)
        for d in truth.defects:
            x0, y0, x1, y1 = d["box"]
            if (x1 - x0) * (y1 - y0) > 0:
                with_hole.add(i)
    return with_hole


@pytest.mark.slow  # trains a tiny model (minutes on a busy 2-core machine), then runs the daemon
def test_daemon_stops_the_machine_for_a_hole_the_emulated_camera_sees(tmp_path: Path, tiny_model: Path,
                                                                       plc: object) -> None:
    """`knitwatch run` with a pylon camera: the emulator streams the simulator's frames from a folder
    (looping), capture -> tiler -> inference -> alert run as processes, and the hole stops the machine
    (the simulated PLC's stop coil) while the frames without it raise no event."""
    from knitwatch.daemon.cli.common import to_toml
    from tests.helpers.cli import KNITWATCH, clean_env
    from tests.helpers.net import free_port, wait_for
    from tests.helpers.procs import read_json_lines

    with_hole = knit_frames(tmp_path / "frames")
    assert with_hole and len(with_hole) < N_FILES
    cfg = {
        "cameras": [{"id": "knit1", "source": "pylon", "fps": 4.0, "position": {"source": "none"},
                     "industrial": {"device": EMU0, "emulator_images": str(tmp_path / "frames")}}],
        "inference": {"device": "cpu", "max_batch_tiles": 16, "max_wait_ms": 20},
        "alert": {"confirm_k": 2, "confirm_n": 3, "min_area_px": 30, "cooldown_frames": 20,
                  "severity": [{"name": "defect", "action": "stop"}]},
        "plc": {"driver": "modbus", "host": "127.0.0.1", "port": plc.port, "stop_address": 0,  # type: ignore[attr-defined]
                "heartbeat_address": 1},
        "store": {"path": str(tmp_path / "store")},
        "daemon": {"runtime_dir": str(tmp_path / "run"), "stats_interval_s": 1.0, "stall_s": 10.0, "drain_s": 3.0},
        "api": {"port": free_port()},
    }
    (tmp_path / "k.toml").write_text(to_toml(cfg))
    decisions = tmp_path / "decisions.jsonl"
    with open(tmp_path / "daemon.log", "w") as logf:
        proc = subprocess.Popen(
            [*KNITWATCH, "--log-format", "json", "run", "--config", str(tmp_path / "k.toml"),
             "--checkpoint", str(tiny_model), "--decisions-log", str(decisions)],
            stdout=logf, stderr=subprocess.STDOUT, env={**clean_env(), "PYLON_CAMEMU": "1"})
    try:
        wait_for(lambda: plc.coil(0), 300, 0.25, what="the stop coil", proc=proc)  # type: ignore[attr-defined]
        wait_for(lambda: len(read_json_lines(decisions)) >= N_FILES + 5, 300, 0.25, what="a loop of the files",
                 proc=proc)
        base = f"http://127.0.0.1:{cfg['api']['port']}"  # type: ignore[index]
        with urllib.request.urlopen(f"{base}/api/stats", timeout=10) as r:
            info = json.load(r)["stages"]["capture.knit1"]["camera_info"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
    assert rc == 0
    rows = read_json_lines(decisions)
    events = [r for r in rows if r["event"]]
    assert events, "no event for the hole"
    # the capture sequence number is the file's index (the emulator starts at the first file and loops)
    assert all(r["seq"] % N_FILES in with_hole for r in events), ([r["seq"] for r in events], sorted(with_hole))
    clean = [r for r in rows if r["seq"] % N_FILES not in with_hole]
    assert clean and sum(r["defect"] for r in clean) <= 0.05 * len(clean)
    assert info["serial"] == EMU0 and info["model"] == "Emulation" and info["grabbed"] > N_FILES
    assert info["lost"] == 0 and info["incomplete"] == 0 and info["disconnects"] == 0
    assert 'knitwatch_camera_frames_lost_total{camera="knit1"} 0.0' in metrics
    assert 'knitwatch_camera_frame_rate{camera="knit1"}' in metrics


def test_trigger_position_follows_the_cameras_frame_counter() -> None:
    """Position source ``trigger``: the emulator's block ids (its frame counter) through the estimator give
    revolution k // N and offset (k % N) x C / N; failed buffers are counter gaps that still advance the
    position; a reopened camera counts from 0 again, and the position counts on from where it was."""
    from knitwatch.pipeline.position import TriggerPosition, make_position

    cam = CameraConfig(id="knit1", source="pylon", fps=50.0,
                       industrial={"device": EMU0, "trigger": "software", "width": 64, "height": 48,  # type: ignore[arg-type]
                                   "frame_timeout_ms": 300},
                       position={"source": "trigger", "frames_per_revolution": 4})  # type: ignore[arg-type]
    est = make_position(cam)
    assert isinstance(est, TriggerPosition)
    src = opened(cam)

    def step() -> tuple[int, int, float, bool]:
        img = first_frame(src)  # a read that triggered a failed frame returns none: the next one triggers again
        assert src.truth is not None
        pos = est.update(img, src.truth)  # as the capture stage does
        return src.truth["frame_counter"], pos["rev"], pos["offset_px"], pos["ok"]

    try:
        got = [step() for _ in range(5)]
        first = got[0][0]
        assert [c - first for c, *_ in got] == [0, 1, 2, 3, 4]  # one block id per triggered frame
        # circumference: 4 x 64 px; frame k at (k // 4, (k % 4) x 64)
        assert [p for _, *p in got] == [[0, 0.0, True], [0, 64.0, True], [0, 128.0, True], [0, 192.0, True],
                                        [1, 0.0, True]]
        f = src.features
        assert f is not None
        f.set("ForceFailedBufferCount", 2)  # the next 2 frames fail: their block ids never arrive
        f.execute("ForceFailedBuffer")
        c, rev, off, ok = step()
        assert c == got[-1][0] + 3 and (rev, off, ok) == (1, 192.0, True)  # frames 5, 6 lost; this is frame 7
        assert est.stats()["counter_gaps"] == 2 and src.stats()["incomplete"] == 2
    finally:
        src.close()
    src.open()  # a reconnect: the camera's counter starts again
    try:
        c, rev, off, ok = step()
        assert c <= first and (rev, off, ok) == (2, 0.0, True)  # the last position plus one
        st = est.stats()
        assert (st["counter_resets"], st["frames"], st["ok"]) == (1, 7, 7)
    finally:
        src.close()
