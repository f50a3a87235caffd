"""The cutline is learned as a normal once-per-revolution feature: never reported, while a defect on it
and a broken needle's line beside it (as anomalous as the cutline) still stop the machine."""

from __future__ import annotations

import numpy as np

from knitwatch.pipeline.decision.frame import decide_frame
from knitwatch.pipeline.decision.severity import SeverityClass
from knitwatch.pipeline.decision.tracking import FramePosition, Tracker, TrackerConfig

W, H = 640, 96  # frame
SPEED = 32.0  # columns per frame
CIRC = 2560.0  # 80 frames per revolution
CUTLINE = 1500.0  # tube coordinate of the cutline
NEEDLE = 400.0  # tube coordinate of a broken needle's line
THR = 1.0  # image threshold (the pixel threshold is 0.5)


def tracker(cutline_factor: float) -> Tracker:
    return Tracker(TrackerConfig(
        confirm_k=2, confirm_n=3, gate_px=48.0, frame_gate_px=128.0, lost_frames=10, recurrence_stop_revolutions=2,
        recurrence_memory_revolutions=3, image_threshold=THR, classes=[SeverityClass("major", "stop")],
        cutline_factor=cutline_factor, cutline_margin_px=32.0, cutline_memory_revolutions=5))


def pos(seq: int) -> FramePosition:
    start = seq * SPEED
    return FramePosition(int(start // CIRC), start % CIRC, CIRC, "test", cutline_px=CUTLINE)


def paint(amap: np.ndarray, p: FramePosition, tube_x: float, width: int, peak: float, rows: slice) -> None:
    x0 = int(round((tube_x - p.offset_px) % CIRC))
    if x0 < W:
        amap[rows, x0 : min(W, x0 + width)] = peak


def run(t: Tracker, frames: range, *, cutline_peak: float, needle_from: int | None = None, needle_peak: float = 1.6,
        hole_at: tuple[int, float] | None = None) -> list[tuple[int, str, str]]:
    """(frame, severity, action) of every new event and escalation. Every frame shows the cutline (8 px
    wide, full height) with ``cutline_peak`` where it is in view; from ``needle_from`` a needle line at
    NEEDLE; ``hole_at`` (first frame, peak): a hole on the cutline, rows 30-60, for 6 frames."""
    out = []
    for seq in frames:
        p = pos(seq)
        amap = np.zeros((H, W), np.float32)
        paint(amap, p, CUTLINE, 8, cutline_peak * (1 + 0.05 * np.sin(seq)), slice(0, H))
        if needle_from is not None and seq >= needle_from:
            paint(amap, p, NEEDLE, 6, needle_peak, slice(0, H))
        if hole_at is not None and hole_at[0] <= seq < hole_at[0] + 6:
            paint(amap, p, CUTLINE - 10, 30, hole_at[1], slice(30, 60))
        frame = decide_frame(t, amap, seq=seq, pos=p, pixel_threshold=0.5, image_threshold=THR, min_area_px=10).tracks
        for d in frame.decisions:
            if d.new_event:
                d.event.event_id = seq
            if d.new_event or d.escalated:
                out.append((seq, d.event.severity.name, d.event.severity.action))
    return out


def test_without_the_learned_cutline_it_stops_the_machine_every_revolution() -> None:
    """The reproduction: a cutline region above the thresholds recurs at one place, so the recurrence
    rule stops the machine for normal fabric."""
    t = tracker(cutline_factor=0.0)
    events = run(t, range(0, 400), cutline_peak=1.5)
    assert [a for _, _, a in events] == ["stop"]  # latched until acknowledged
    assert t.stats()["recurring_defects"] == 1 and t.stats()["cutline_normal_regions"] == 0


def test_the_learned_cutline_is_never_reported_and_counted() -> None:
    t = tracker(cutline_factor=2.0)
    assert run(t, range(0, 400), cutline_peak=1.5) == []  # 5 revolutions of cutline, no event
    s = t.stats()
    assert s["cutline_normal_regions"] > 0 and s["cutline_defect_regions"] == 0
    assert s["cutline_level"] is not None and 1.4 < float(s["cutline_level"]) < 1.6


def test_a_needle_line_as_anomalous_as_the_cutline_still_recurs_to_a_stop() -> None:
    t = tracker(cutline_factor=2.0)
    events = run(t, range(0, 400), cutline_peak=1.5, needle_from=100, needle_peak=1.5)
    assert [a for _, _, a in events] == ["stop"] and events[0][0] >= 100  # nothing before the needle broke
    assert t.stats()["recurring_defects"] == 1 and t.stats()["cutline_defect_regions"] == 0


def test_a_hole_on_the_cutline_is_a_defect() -> None:
    """A hole that crosses the cutline after the cutline's level was learned (revolution 2): its peak
    is well above the learned level, so it is an event and a stop; the cutline itself is still none."""
    seq0 = int((CUTLINE - 320) // SPEED) + 160  # the cutline in the middle of the view, revolution 2
    t = tracker(cutline_factor=2.0)
    events = run(t, range(0, 260), cutline_peak=1.5, hole_at=(seq0, 6.0))
    assert [(a, seq0 <= s < seq0 + 6) for s, _, a in events] == [("stop", True)]
    assert t.stats()["cutline_defect_regions"] >= 2
