"""Industrial camera settings without a camera: the config schema's checks, the grab counters, and the
errors for what the pylon emulator cannot show (it offers every pixel format and has the GigE nodes)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from knitwatch.config.settings import CameraConfig
from knitwatch.pipeline.sources.genicam import CameraSettingError, GrabStats, apply_settings


def test_genicam_source_needs_a_gentl_producer() -> None:
    with pytest.raises(ValidationError, match="gentl_producer"):
        CameraConfig(id="g", source="genicam")
    cam = CameraConfig(id="g", source="genicam", industrial={"gentl_producer": "/opt/vendor/x.cti"})  # type: ignore[arg-type]
    assert str(cam.industrial.gentl_producer) == "/opt/vendor/x.cti"


@pytest.mark.parametrize(("field", "value"), [
    ("pixel_format", "Mono12"),  # 8 bits a channel only
    ("trigger", "encoder"),
    ("trigger_line", "Input1"),
    ("trigger_edge", "both"),
    ("exposure_us", 0),
    ("packet_size", 100),
    ("frame_timeout_ms", 5),
    ("no_such_key", 1),
])
def test_industrial_settings_are_checked_by_the_schema(field: str, value: Any) -> None:  # noqa: ANN401
    with pytest.raises(ValidationError) as e:
        CameraConfig(id="c", source="pylon", industrial={field: value})  # type: ignore[arg-type]
    assert field in str(e.value)


def test_lost_frames_are_the_gaps_in_the_block_ids() -> None:
    s = GrabStats()
    for block in (0, 1, 2, 5, 6, 10):
        s.frame(block)
    assert (s.grabbed, s.skipped) == (6, 2 + 3)
    s.restart()  # a reconnect: block ids start again, nothing counted as lost
    s.frame(0)
    s.frame(1)
    assert (s.grabbed, s.skipped) == (8, 5)


class MonoUsbCamera:
    """The feature table of a monochrome USB3 camera: what the emulator cannot be (it offers every pixel
    format and has the GigE transport nodes). Only the error paths run on it."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {"PixelFormat": "Mono8", "Width": 1920, "Height": 1200, "ExposureTime": 5000.0,
                                       "TriggerMode": "Off", "TriggerSelector": "FrameStart",
                                       "AcquisitionFrameRate": 30.0, "AcquisitionFrameRateEnable": False}
        self.enums = {"PixelFormat": ["Mono8", "Mono12"], "TriggerMode": ["Off", "On"],
                      "TriggerSelector": ["FrameStart"]}
        self.ranges = {"Width": (16, 1920, 16), "Height": (16, 1200, 2), "ExposureTime": (20.0, 1e6, 1),
                       "AcquisitionFrameRate": (1.0, 160.0, 1)}

    def has(self, name: str) -> bool:
        return name in self.values

    def writable(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str) -> Any:  # noqa: ANN401
        return self.values[name]

    def set(self, name: str, value: Any) -> None:  # noqa: ANN401
        self.values[name] = value

    def limits(self, name: str) -> tuple[float, float, float] | None:
        return self.ranges.get(name)  # type: ignore[return-value]

    def choices(self, name: str) -> list[str] | None:
        return self.enums.get(name)

    def execute(self, name: str) -> None:
        raise AssertionError(name)


@pytest.mark.parametrize(("industrial", "message"), [
    ({"pixel_format": "BayerRG8"}, "camera c1 (acA1920 123): industrial.pixel_format = 'BayerRG8' is not offered "
                                   "by the camera (PixelFormat: Mono8, Mono12)"),
    ({"packet_size": 9000}, "industrial.packet_size cannot be set: the camera has no writable GevSCPSPacketSize"),
    ({"width": 1000}, "industrial.width = 1000 is not a step of 16 from 16 (Width)"),
    ({"gain_db": 6.0}, "industrial.gain_db cannot be set: the camera has no writable Gain or GainAbs"),
])
def test_what_a_camera_lacks_is_an_error_naming_camera_and_setting(industrial: dict, message: str) -> None:
    cam = CameraConfig(id="c1", source="pylon", industrial=industrial)  # type: ignore[arg-type]
    with pytest.raises(CameraSettingError) as e:
        apply_settings(MonoUsbCamera(), cam, "acA1920 123")
    assert message in str(e.value)


def test_settings_a_camera_takes_are_written_and_read_back() -> None:
    f = MonoUsbCamera()
    cam = CameraConfig(id="c1", source="pylon", fps=25.0,  # type: ignore[arg-type]
                       industrial={"pixel_format": "Mono8", "width": 1280, "height": 720, "exposure_us": 800})
    got = apply_settings(f, cam, "acA1920 123")
    assert got["width"] == 1280 and got["height"] == 720 and got["exposure_us"] == 800.0
    assert got["trigger"] == "free_run" and got["frame_rate"] == 25.0 and f.values["AcquisitionFrameRateEnable"]
    assert got["packet_size"] is None  # a USB camera: no GigE packet size


def test_industrial_camera_counters_become_prometheus_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from knitwatch.daemon.api.metrics import DaemonCollector

    class View:
        def stats_snapshot(self) -> dict[str, Any]:
            return {"stages": {
                "capture.knit1": {"camera": "knit1", "camera_info": {
                    "serial": "24012345", "incomplete": 3, "lost": 7, "buffer_underruns": 1, "disconnects": 2,
                    "frame_rate": 9.5, "trigger_rate": 10.0, "temperature_c": None}},
                "capture.sim": {"camera": "sim"},  # a simulator: no camera_info, no camera metrics
            }}

        def health(self) -> dict[str, Any]:
            return {}

    class NoStore:
        def peek(self) -> None:
            return None

    registry = CollectorRegistry()
    registry.register(DaemonCollector(View(), NoStore()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'knitwatch_camera_frames_lost_total{camera="knit1"} 7.0' in text
    assert 'knitwatch_camera_frames_incomplete_total{camera="knit1"} 3.0' in text
    assert 'knitwatch_camera_disconnects_total{camera="knit1"} 2.0' in text
    assert 'knitwatch_camera_trigger_rate{camera="knit1"} 10.0' in text
    assert 'camera="sim"' not in text and "knitwatch_camera_temperature_celsius{" not in text
