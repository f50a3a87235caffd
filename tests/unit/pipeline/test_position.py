"""The fabric position of each frame (knitwatch.pipeline.position) against the simulator's truth, and
the PLC source against the simulated PLC's registers (a real Modbus TCP server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from knitwatch.config.settings import CameraConfig, PositionConfig, PositionPlcConfig, SimulatorConfig
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.messages import POS
from knitwatch.pipeline.position import (
    ImagePosition,
    PlcPosition,
    SimulatorPosition,
    find_cutline,
    make_position,
    profile_period,
)
from knitwatch.pipeline.sources.base import SimulatorSource
from knitwatch.pipeline.sources.knitsim import FabricSpec, FrameTruth, KnitStream, ScheduledDefect

# a small machine: circumference 24 x 30 = 720 px, a 320 px wide view; strong lighting drift, noise,
# a broken needle's line every revolution from frame 3 and random defects
W, H, SPEED, REV_FRAMES = 320, 96, 24.0, 30
C_TRUE = int(SPEED * REV_FRAMES)
N_FRAMES = 4 * REV_FRAMES


@pytest.fixture(scope="module")
def stream() -> list[tuple[np.ndarray, FrameTruth]]:
    ks = KnitStream(W, H, FabricSpec(noise_sigma=5.0), seed=11, speed_px=SPEED, revolution_frames=REV_FRAMES,
                    lighting_drift=0.3, random_defect_rate=0.05,
                    defects=[ScheduledDefect("needle_line", 3, every_revolution=True, size=1.5, intensity=1.5)])
    return [ks.frame(i) for i in range(N_FRAMES)]


def turns_error(pos: dict[str, Any], truth: FrameTruth) -> float:
    """Estimated minus true position, in revolutions (a wrong revolution counts whole)."""
    true_turns = truth.revolution + truth.offset_px / truth.circumference_px
    return pos["rev"] + pos["offset_px"] / pos["circumference_px"] - true_turns


def run(est: ImagePosition, frames: Iterator[tuple[np.ndarray, FrameTruth]]) -> list[dict[str, Any]]:
    return [est.update(img, None) for img, _ in frames]


def test_image_position_follows_the_simulator(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    est = ImagePosition(PositionConfig())
    out = run(est, iter(stream))
    for pos, (_, truth) in zip(out, stream, strict=True):
        assert POS(pos) is None, pos  # what the wire schema accepts
        if pos["circumference_px"] is None:  # before the second cutline: the distance since frame 0
            assert abs(pos["offset_px"] - (truth.revolution * C_TRUE + truth.offset_px)) < 1.0
            continue
        assert 0 <= pos["offset_px"] < pos["circumference_px"]
        assert abs(turns_error(pos, truth)) * C_TRUE < 1.0, (truth.index, pos, truth.offset_px)
    assert all(p["ok"] for p in out)
    learned = [i for i, p in enumerate(out) if p["circumference_px"] is not None]
    assert learned and learned[0] < 2 * REV_FRAMES  # at the cutline's second pass
    assert abs(out[-1]["circumference_px"] - C_TRUE) < 1.0
    assert out[-1]["rev"] == stream[-1][1].revolution == 3  # the revolution count is exact
    seen = [t.cutline_visible for _, t in stream]
    passes = sum(1 for i, v in enumerate(seen) if v and not (i and seen[i - 1]))
    stats = est.stats()
    assert stats["cutline_passes"] == passes == 4
    assert stats["ok"] == N_FRAMES and stats["lost"] == 0 and stats["source"] == "image"
    assert abs(stats["pitch_px"] - 6.0) < 0.1  # measured from the frames


def test_wide_frames_are_shrunk_horizontally(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    """Frames wider than work_width are measured at half (a third ...) the width, in frame pixels."""
    est = ImagePosition(PositionConfig(work_width=160))
    out = run(est, iter(stream))
    assert est.disp.tracker is not None and est.disp.tracker.fx == 2.0
    errors = [abs(turns_error(p, t)) * C_TRUE for p, (_, t) in zip(out, stream, strict=True) if p["circumference_px"]]
    assert errors and max(errors) < 1.0
    assert est.stats()["cutline_passes"] == 4 and abs(est.stats()["pitch_px"] - 6.0) < 0.1


def test_a_configured_circumference_is_a_first_guess(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    """circumference_px set 3 % short: known from the first frame, replaced by the measured one at the
    cutline's second pass, exact from then on."""
    est = ImagePosition(PositionConfig(circumference_px=700.0))
    out = run(est, iter(stream))
    assert all(p["circumference_px"] is not None for p in out)
    second = 2 * REV_FRAMES  # by then the cutline came by twice
    assert all(abs(turns_error(p, t)) * C_TRUE < 1.0 for p, (_, t) in list(zip(out, stream, strict=True))[second:])
    assert abs(out[-1]["circumference_px"] - C_TRUE) < 1.0 and est.stats()["cutline_rejected"] == 0


def test_a_place_on_the_fabric_keeps_its_tube_coordinate(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    """The contract: a region at frame column x lies at (offset_px + x) mod circumference_px - the
    broken needle's line stays at one tube coordinate through every frame and revolution."""
    est = ImagePosition(PositionConfig())
    places = []
    width = max(d["box"][2] - d["box"][0] for _, t in stream for d in t.defects if d["id"] == 0)
    for (_, truth), pos in zip(stream, run(est, iter(stream)), strict=True):
        c = pos["circumference_px"]
        for d in truth.defects:
            x0, _, x1, _ = d["box"]
            if d["id"] == 0 and c is not None and x1 - x0 == width:  # the scheduled line, fully in view
                places.append(((pos["offset_px"] + (x0 + x1) / 2.0) % c, truth.revolution))
    revs = {r for _, r in places}
    assert len(revs) >= 2, "the needle line was seen in fewer than two revolutions"
    xs = np.array([x for x, _ in places])
    assert xs.max() - xs.min() < 2.0, xs


def test_cutline_found_and_a_needle_line_is_not_one(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    with_cut = next((img, t) for img, t in stream
                    if t.cutline_box is not None and t.cutline_box[0] > 20 and t.cutline_box[2] < W - 20)
    without = next((img, t) for img, t in stream if t.cutline_box is None and not t.defects)
    pitch = profile_period([with_cut[0].astype(np.float32).mean(axis=0), without[0].astype(np.float32).mean(axis=0)])
    assert pitch is not None and abs(pitch - 6.0) < 0.1
    img, truth = with_cut
    found = find_cutline(img.astype(np.float32).mean(axis=0), pitch, 5, 0.18)
    assert truth.cutline_box is not None and found is not None
    x0, _, x1, _ = truth.cutline_box
    assert abs(found[0] - (x0 + x1) / 2.0) < pitch and found[1] > 0.18
    plain = without[0].astype(np.float32)
    assert find_cutline(plain.mean(axis=0), pitch, 5, 0.18) is None
    # a dark line one wale wide (a broken needle): one stripe, not the cutline's two
    dark = plain.copy()
    dark[:, 150:156] *= 0.45
    profile = dark.mean(axis=0)
    assert find_cutline(profile, pitch, 5, 0.18) is None
    single = find_cutline(profile, pitch, 0, 0.18)
    assert single is not None and abs(single[0] - 153.0) < pitch


def test_weak_frames_are_flagged_carried_on_and_recovered(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    """A covered lens (black) and noise frames: not measured (ok false), the position carried on at
    the fabric's speed; after a long outage the next cutline puts it right again."""
    rng = np.random.default_rng(0)
    short = {20, 21, 22}
    long = set(range(70, 82))  # 12 frames: beyond what can be bridged by the last frame's overlap
    est = ImagePosition(PositionConfig())
    out = []
    for i, (img, _) in enumerate(stream):
        if i in short:
            img = rng.integers(0, 256, img.shape, dtype=np.uint8)
        elif i in long:
            img = np.zeros_like(img)
        out.append(est.update(img, None))
    assert not any(out[i]["ok"] for i in short | long)
    assert all(out[i]["ok"] for i in range(N_FRAMES) if i not in short | long and i < 70)
    for i in sorted(short | long):  # carried on at the speed: still close
        if out[i]["circumference_px"] is not None:
            assert abs(turns_error(out[i], stream[i][1])) * C_TRUE < 6.0, i
    after = [i for i in range(82, N_FRAMES) if out[i]["ok"]]
    assert after, "never recovered"
    for i in after:
        assert abs(turns_error(out[i], stream[i][1])) * C_TRUE < 1.0, (i, out[i])
    assert out[-1]["rev"] == stream[-1][1].revolution
    # the first frame after the long outage has no frame in view to be measured against
    assert est.stats()["weak_frames"] == len(short | long) + 1
    assert not out[82]["ok"] and out[83]["ok"] is (est.stats()["lost"] == len(short | long) + 1)


def test_another_frame_size_starts_afresh(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    est = ImagePosition(PositionConfig(circumference_px=None))
    run(est, iter(stream[:2 * REV_FRAMES]))
    assert est.circ is not None
    pos = est.update(stream[0][0][:, :200], None)
    assert pos["circumference_px"] is None and not pos["ok"] and est.disp.resets == 1


def test_simulator_position_is_the_truth() -> None:
    sim = SimulatorConfig(speed_px=24.0, revolution_frames=10, seed=2)
    src = SimulatorSource(96, 32, fps=10.0, sim=sim)
    src.open()
    est = SimulatorPosition()
    for i in range(25):
        img = src.read()
        assert img is not None and src.truth is not None
        pos = est.update(img, src.truth)
        start = round(i * 24.0)
        assert pos == {"rev": start // 240, "offset_px": float(start % 240), "circumference_px": 240.0,
                       "source": "simulator", "ok": True, "cutline_px": float(src.truth["cutline_px"])}
    assert est.update(img, None)["ok"] is False  # no truth: nothing known


def test_make_position_from_settings() -> None:
    assert make_position(CameraConfig(position=PositionConfig(source="none"))) is None
    assert isinstance(make_position(CameraConfig()), ImagePosition)  # the default
    assert isinstance(make_position(CameraConfig(position=PositionConfig(source="simulator"))), SimulatorPosition)
    with pytest.raises(ValueError, match="position source 'simulator' needs source 'simulator'"):
        CameraConfig(source="folder", uri="/x", position=PositionConfig(source="simulator"))
    with pytest.raises(ValueError, match="angle_register 101 overlaps"):
        PositionPlcConfig(revolution_register=100, revolution_words=2, angle_register=101)


# -- the PLC source ---------------------------------------------------------------------------------


@pytest.fixture
def plc() -> Iterator[SimulatedPlc]:
    p = SimulatedPlc().start()
    try:
        yield p
    finally:
        p.stop()


class Machine:
    """The machine's controller: writes its counters into the PLC's holding registers."""

    def __init__(self, plc: SimulatedPlc) -> None:
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient(plc.host, port=plc.port, timeout=2.0)
        assert self.client.connect()

    def set(self, address: int, *values: int) -> None:
        rr = self.client.write_registers(address, list(values), device_id=1)
        assert not rr.isError(), rr

    def close(self) -> None:
        self.client.close()


def plc_config(plc: SimulatedPlc, **kw: Any) -> PositionConfig:  # noqa: ANN401
    circ = kw.pop("circumference_px", None)
    return PositionConfig(source="plc", circumference_px=circ,
                          plc=PositionPlcConfig(host=plc.host, port=plc.port, timeout_s=1.0, **kw))


def test_plc_counter_and_angle(plc: SimulatedPlc) -> None:
    machine = Machine(plc)
    est = PlcPosition(plc_config(plc, revolution_register=10, angle_register=12, angle_full_scale=3600,
                                 stale_s=0.5, circumference_px=8000.0), threaded=False)
    frame = np.zeros((32, 64), np.uint8)  # not looked at: counter, angle and circumference are known
    try:
        assert est.disp is None
        machine.set(10, 65534)
        machine.set(12, 900)
        assert est.reader.read_once()
        pos = est.update(frame)
        assert pos == {"rev": 65534, "offset_px": 2000.0, "circumference_px": 8000.0, "source": "plc", "ok": True,
                       "cutline_px": None}
        assert POS(pos) is None
        for counter, angle, rev in ((65535, 3599, 65535), (0, 0, 65536), (1, 1800, 65537)):  # the counter wraps
            machine.set(10, counter)
            machine.set(12, angle)
            assert est.reader.read_once()
            pos = est.update(frame)
            assert (pos["rev"], pos["offset_px"]) == (rev, round(angle / 3600 * 8000.0, 2))
        machine.set(10, 0)  # counted backwards: the machine's counter was reset (a new roll)
        assert est.reader.read_once()
        assert est.update(frame)["rev"] == 65537 and est.stats()["counter_resets"] == 1
        plc.stop()  # the PLC is gone: the last values stay, and go stale
        assert not est.reader.read_once() and est.reader.failures == 1 and "PLC" in est.reader.error
        assert est.update(frame)["ok"] is True
        time.sleep(0.6)
        assert est.update(frame)["ok"] is False
        assert est.stats()["lost"] == 1 and est.stats()["plc_failures"] == 1
    finally:
        machine.close()
        est.close()


def test_plc_32_bit_counter_read_by_the_thread(plc: SimulatedPlc) -> None:
    machine = Machine(plc)
    est = PlcPosition(plc_config(plc, revolution_register=20, revolution_words=2, angle_register=22, poll_s=0.02,
                                 circumference_px=1000.0))
    try:
        machine.set(20, 1, 5)  # high word first: 65541
        machine.set(22, 1800)
        deadline = time.monotonic() + 10
        # the test sets the two registers one after the other: wait for a read that saw both
        while time.monotonic() < deadline and (est.reader.latest() or (0, None))[:2] != (65541, 1800):
            time.sleep(0.02)
        pos = est.update(np.zeros((8, 8), np.uint8))
        assert (pos["rev"], pos["offset_px"], pos["ok"]) == (65541, 500.0, True)
    finally:
        machine.close()
        est.close()


Stream = list[tuple[np.ndarray, FrameTruth]]


def test_plc_counter_with_the_image_displacement(plc: SimulatedPlc, stream: Stream) -> None:
    """No angle register, no circumference setting: the offset is the image displacement since the
    counter last counted, the circumference the displacement over a whole revolution."""
    machine = Machine(plc)
    est = PlcPosition(plc_config(plc, revolution_register=0), threaded=False)
    out = []
    try:
        for img, truth in stream:
            machine.set(0, 40 + truth.revolution)  # the machine counts at the tube's origin
            assert est.reader.read_once()
            out.append(est.update(img))
    finally:
        machine.close()
        est.close()
    assert not any(p["ok"] for p in out[:2 * REV_FRAMES - 1])  # circumference unknown until 2 counts
    assert all(p["ok"] for p in out[2 * REV_FRAMES:])
    assert abs(out[-1]["circumference_px"] - C_TRUE) < 1.0
    for pos, (_, truth) in list(zip(out, stream, strict=True))[2 * REV_FRAMES:]:
        assert pos["rev"] == 40 + truth.revolution
        assert abs(pos["offset_px"] - truth.offset_px) < 1.0, (truth.index, pos)


def test_the_cutline_is_known_from_its_first_pass(stream: list[tuple[np.ndarray, FrameTruth]]) -> None:
    """Before the circumference is known (the second pass), ``cutline_px`` is in the offset's unwrapped
    coordinate: where the frame shows the cutline, else where its first pass was - so the decision
    layer can tell the cutline from a defect from its first pass on."""
    est = ImagePosition(PositionConfig())
    out = run(est, iter(stream))
    early = [(p, t) for p, (_, t) in zip(out, stream, strict=True) if p["circumference_px"] is None]
    known = [(p, t) for p, t in early if p["cutline_px"] is not None]
    first = known[0][0]["cutline_px"]
    assert all(abs(p["cutline_px"] - first) < 3 for p, t in known if not t.cutline_visible)  # between passes
    on_it = []
    for p, t in known:
        if t.cutline_visible and abs(p["cutline_px"] - first) >= 3:  # found in this frame: where it shows it
            x0, _, x1, _ = t.cutline_box  # (within half the decision layer's default margin: the edges cut it)
            assert x0 - 16 <= p["cutline_px"] - p["offset_px"] <= x1 + 16, (p, t.cutline_box)
            on_it.append(t.revolution)
    assert on_it.count(1) >= 2  # the second pass is known before the circumference is (then from it)
    later = [p for p in out if p["circumference_px"] is not None]
    assert later and all(abs(p["cutline_px"] - first) < 3 for p in later)


def test_image_position_learns_the_fabric_afresh_when_the_machine_changes_article() -> None:
    """Jersey at a 6 px pitch, then (frame 50) pique of another yarn at 9 px: the pitch is measured again,
    the new fabric's cutline and circumference are learned, and the revolutions count on, one a revolution."""
    sim = SimulatorConfig(pitch_px=6.0, speed_px=SPEED, revolution_frames=REV_FRAMES, seed=4, change_frame=50,
                          change_texture="pique", change_pitch_px=9.0, change_brightness=100.0)
    src = SimulatorSource(W, H, fps=10.0, sim=sim)
    src.open()
    est = ImagePosition(PositionConfig())
    out, truths = [], []
    for _ in range(50 + 5 * REV_FRAMES):
        img = src.read()
        assert img is not None
        out.append(est.update(img, None))
        truths.append(dict(src.truth or {}))
    assert est.fabric_changes == 1 and abs(est.pitch - 9.0) < 0.5
    revs = [p["rev"] for p in out]
    assert revs == sorted(revs), "revolutions went back"
    # the new fabric learned afresh (no circumference for a while), then a revolution counted per true revolution
    relearn = max(i for i, p in enumerate(out) if p["circumference_px"] is None)
    assert truths[relearn]["texture"] == "pique"
    known = list(zip(out, truths, strict=True))[relearn + 1:]
    assert known and abs(known[-1][0]["circumference_px"] - C_TRUE) < 2.0

    def turns(p: dict, t: dict) -> tuple[float, float]:  # (estimated, true) revolutions turned
        return (p["rev"] + p["offset_px"] / p["circumference_px"],
                t["revolution"] + t["offset_px"] / t["circumference_px"])

    (e0, t0), (e1, t1) = turns(*known[0]), turns(*known[-1])
    assert t1 - t0 >= 2 and abs((e1 - e0) - (t1 - t0)) < 0.01
