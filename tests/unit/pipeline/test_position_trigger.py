"""The fabric position from the camera's frame counter (position source ``trigger``): frame k of a
hardware trigger that fires N times a revolution is revolution k // N at offset (k % N) x C / N."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knitwatch.config import ConfigError, load_settings
from knitwatch.config.settings import CameraConfig, PositionConfig
from knitwatch.pipeline.position import TriggerPosition, make_position

FRAME = np.zeros((4, 100), np.uint8)  # 100 px wide


def feed(est: TriggerPosition, counters: list[int | None]) -> list[tuple[int, float, bool]]:
    out = []
    for c in counters:
        pos = est.update(FRAME, None if c is None else {"frame_counter": c})
        out.append((pos["rev"], pos["offset_px"], pos["ok"]))
    return out


def test_counter_gives_revolution_and_offset_counted_from_the_first_frame() -> None:
    est = TriggerPosition(PositionConfig(source="trigger", frames_per_revolution=4))
    got = feed(est, [17, 18, 19, 20, 21, 22])  # the camera's counter did not start at 0
    # circumference defaults to N x frame width = 400 px; one frame = 100 px = 90 degrees
    assert got == [(0, 0.0, True), (0, 100.0, True), (0, 200.0, True), (0, 300.0, True), (1, 0.0, True),
                   (1, 100.0, True)]
    pos = est.last
    assert pos is not None and pos["circumference_px"] == 400.0 and pos["source"] == "trigger"
    st = est.stats()
    assert (st["frames"], st["ok"], st["counter"], st["counter_gaps"], st["counter_resets"]) == (6, 6, 22, 0, 0)


def test_gaps_are_lost_frames_and_still_advance_the_position() -> None:
    est = TriggerPosition(PositionConfig(source="trigger", frames_per_revolution=3, circumference_px=900.0))
    got = feed(est, [1, 2, 5, 9])  # 3 and 4 lost, then 6, 7, 8 lost
    assert got == [(0, 0.0, True), (0, 300.0, True), (1, 300.0, True), (2, 600.0, True)]
    assert est.stats()["counter_gaps"] == 5


def test_a_counter_that_goes_back_restarts_from_the_last_position_plus_one() -> None:
    est = TriggerPosition(PositionConfig(source="trigger", frames_per_revolution=4))
    got = feed(est, [10, 11, 12, 0, 1, 3])  # a reconnect: the camera counts from 0 again
    assert [(r, o) for r, o, _ in got] == [(0, 0.0), (0, 100.0), (0, 200.0), (0, 300.0), (1, 0.0), (1, 200.0)]
    assert all(ok for *_, ok in got)
    st = est.stats()
    assert (st["counter_resets"], st["counter_gaps"], st["counter"]) == (1, 1, 3)


def test_frames_without_a_counter_are_not_ok_and_dead_reckoned() -> None:
    est = TriggerPosition(PositionConfig(source="trigger", frames_per_revolution=4))
    got = feed(est, [None, 5, None, None, 8, None, 11])
    assert got == [(0, 0.0, False), (0, 100.0, True), (0, 200.0, False), (0, 300.0, False), (1, 0.0, True),
                   (1, 100.0, False), (1, 300.0, True)]  # the counter places the frame: 9 or 10 was lost
    st = est.stats()
    assert (st["no_counter"], st["ok"], st["lost"], st["counter_gaps"]) == (4, 3, 4, 1)
    # a simulator's truth (no frame_counter) or a counter of the wrong type is no counter either
    assert est.update(FRAME, {"offset_px": 5.0, "revolution": 0, "circumference_px": 9.0})["ok"] is False
    assert est.update(FRAME, {"frame_counter": True})["ok"] is False


def test_make_position_builds_it_from_the_camera_config() -> None:
    cam = CameraConfig(id="k", source="pylon", position={"source": "trigger", "frames_per_revolution": 8})  # type: ignore[arg-type]
    est = make_position(cam)
    assert isinstance(est, TriggerPosition) and est.n == 8


def test_frames_per_revolution_is_required_and_named(tmp_path: Path) -> None:
    p = tmp_path / "k.toml"
    p.write_text('[[cameras]]\nid = "knit1"\nsource = "pylon"\n[cameras.position]\nsource = "trigger"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert "cameras.0.position" in str(e.value) and "frames_per_revolution is required" in str(e.value)
    p.write_text('[[cameras]]\nid = "knit1"\nsource = "pylon"\n[cameras.position]\nsource = "trigger"\n'
                 "frames_per_revolution = 0\n")
    with pytest.raises(ConfigError, match="frames_per_revolution"):
        load_settings(p)
