"""GenICam cameras: the settings both industrial sources share, and the ``genicam`` source.

Both SDKs speak GenICam's standard feature names (SFNC: ``PixelFormat``, ``ExposureTime``, ``TriggerMode``
...); older Basler GigE cameras use the ``...Abs`` variants, tried second. :func:`apply_settings` writes a
camera's :class:`IndustrialCameraConfig` through a small :class:`Features` adapter (one per SDK), checks
each value against what the camera offers first (an error names the camera and the setting, with the
camera's range or choices) and reads every value back.

The ``genicam`` source grabs through ``harvesters`` from the GenTL producer (.cti) the user names; the
``pylon`` source (:mod:`knitwatch.pipeline.sources.pylon`) uses Basler's pypylon.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import structlog

from knitwatch.config.settings import CameraConfig, IndustrialCameraConfig
from knitwatch.pipeline.sources.base import SourceError

log = structlog.get_logger(__name__)

EDGES = {"rising": "RisingEdge", "falling": "FallingEdge", "any": "AnyEdge"}
# GenICam names the Bayer pattern by its top-left 2x2 cell, OpenCV by the cell one pixel down and right
BAYER_TO_BGR = {
    "BayerRG8": cv2.COLOR_BayerBG2BGR,
    "BayerGR8": cv2.COLOR_BayerGB2BGR,
    "BayerGB8": cv2.COLOR_BayerGR2BGR,
    "BayerBG8": cv2.COLOR_BayerRG2BGR,
}
# a pixel format's other spellings (GenICam 1 "...Packed" names of Basler's older cameras)
FORMAT_ALIASES = {"RGB8": ("RGB8", "RGB8Packed"), "BGR8": ("BGR8", "BGR8Packed")}
TEMPERATURE_FEATURES = ("DeviceTemperature", "TemperatureAbs")


class CameraSettingError(SourceError):
    """A configured value the camera cannot take (or a camera that cannot be found): names camera and setting."""


class Features(Protocol):
    """The features (GenApi nodes) of an open camera, whatever the SDK."""

    def has(self, name: str) -> bool: ...  # exists and is readable
    def writable(self, name: str) -> bool: ...
    def get(self, name: str) -> Any: ...  # noqa: ANN401 - int, float, str or bool by the node's type
    def set(self, name: str, value: Any) -> None: ...  # noqa: ANN401
    def limits(self, name: str) -> tuple[float, float, float] | None: ...  # min, max, increment (1 for floats)
    def choices(self, name: str) -> list[str] | None: ...  # an enumeration's available entries, else None
    def execute(self, name: str) -> None: ...


def node_limits(node: Any, lo: str, hi: str, inc: str, value: str) -> tuple[float, float, float] | None:  # noqa: ANN401
    """A number node's (min, max, increment; 1 for floats) through the SDK's attribute names, else None."""
    try:
        low, high = float(getattr(node, lo)), float(getattr(node, hi))
    except Exception:  # noqa: BLE001 - not a number node
        return None
    try:
        step = float(getattr(node, inc)) if isinstance(getattr(node, value), int) else 1.0
    except Exception:  # noqa: BLE001
        step = 1.0
    return low, high, max(1.0, step)


def node_choices(node: Any, symbolics: str) -> list[str] | None:  # noqa: ANN401
    """An enumeration node's available entries through the SDK's attribute name, else None."""
    try:
        return [str(v) for v in getattr(node, symbolics)]
    except Exception:  # noqa: BLE001 - not an enumeration
        return None


def first_feature(f: Features, *names: str) -> str | None:
    return next((n for n in names if f.has(n)), None)


def to_image(data: np.ndarray, pixel_format: str) -> np.ndarray:
    """A grabbed 8-bit frame -> gray (H, W) or BGR (H, W, 3) as the pipeline takes it."""
    if pixel_format in BAYER_TO_BGR:
        return cv2.cvtColor(data, BAYER_TO_BGR[pixel_format])
    if pixel_format.startswith("RGB8"):
        return cv2.cvtColor(data.reshape(data.shape[0], -1, 3), cv2.COLOR_RGB2BGR)
    if pixel_format.startswith("BGR8"):
        return np.ascontiguousarray(data.reshape(data.shape[0], -1, 3))
    return data


class _Settings:
    def __init__(self, f: Features, cam: CameraConfig, model: str) -> None:
        self.f, self.cam, self.cfg = f, cam, cam.industrial
        self.where = f"camera {cam.id} ({model})"

    def fail(self, setting: str, why: str) -> CameraSettingError:
        return CameraSettingError(f"{self.where}: industrial.{setting} {why}")

    def need(self, setting: str, *names: str) -> str:
        name = first_feature(self.f, *names)
        if name is None or not self.f.writable(name):
            raise self.fail(setting, f"cannot be set: the camera has no writable {' or '.join(names)}")
        return name

    def number(self, setting: str, value: float, *names: str, integer: bool = False) -> None:
        name = self.need(setting, *names)
        lim = self.f.limits(name)
        if lim is not None:
            lo, hi, inc = lim
            if not lo <= value <= hi:
                raise self.fail(setting, f"= {value:g} is outside the camera's range {lo:g} .. {hi:g} ({name})")
            if integer and inc > 1 and (value - lo) % inc:
                raise self.fail(setting, f"= {value:g} is not a step of {inc:g} from {lo:g} ({name})")
        try:
            self.f.set(name, int(value) if integer else float(value))
        except Exception as e:  # noqa: BLE001 - the SDK's refusal is the finding, with its words
            raise self.fail(setting, f"= {value:g} was refused ({name}): {first_line(e)}") from None

    def enum(self, setting: str, want: str | tuple[str, ...], *names: str) -> str:
        name = self.need(setting, *names)
        options = self.f.choices(name) or []
        wants = (want,) if isinstance(want, str) else want
        pick = next((w for w in wants if w in options), None)
        if pick is None:
            raise self.fail(setting, f"= {wants[0]!r} is not offered by the camera ({name}: {', '.join(options)})")
        if self.f.get(name) != pick:
            try:
                self.f.set(name, pick)
            except Exception as e:  # noqa: BLE001
                raise self.fail(setting, f"= {pick!r} was refused ({name}): {first_line(e)}") from None
        return pick

    def optional_off(self, *names: str) -> None:
        """Switch an automatic (ExposureAuto, GainAuto) off where the camera has it."""
        for name in names:
            if self.f.has(name) and self.f.writable(name) and "Off" in (self.f.choices(name) or []):
                self.f.set(name, "Off")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def apply_settings(f: Features, cam: CameraConfig, model: str) -> dict[str, Any]:
    """Write ``cam.industrial`` to an open camera that is not grabbing; returns the values read back."""
    cfg = cam.industrial
    s = _Settings(f, cam, model)
    s.enum("pixel_format", FORMAT_ALIASES.get(cfg.pixel_format, (cfg.pixel_format,)), "PixelFormat")
    roi = {"width": cfg.width, "height": cfg.height, "offset_x": cfg.offset_x, "offset_y": cfg.offset_y}
    if any(v is not None for v in roi.values()):
        for setting, name in (("offset_x", "OffsetX"), ("offset_y", "OffsetY")):  # room for the new size first
            if roi[setting] is not None and f.has(name) and f.writable(name):
                f.set(name, 0)
        for setting, name in (("width", "Width"), ("height", "Height"), ("offset_x", "OffsetX"),
                              ("offset_y", "OffsetY")):
            if roi[setting] is not None:
                s.number(setting, float(roi[setting]), name, integer=True)  # type: ignore[arg-type]
    if cfg.exposure_us is not None:
        s.optional_off("ExposureAuto")
        if first_feature(f, "ExposureMode") and "Timed" in (f.choices("ExposureMode") or []):
            s.enum("exposure_us", "Timed", "ExposureMode")
        s.number("exposure_us", cfg.exposure_us, "ExposureTime", "ExposureTimeAbs")
    if cfg.gain_db is not None:
        s.optional_off("GainAuto")
        s.number("gain_db", cfg.gain_db, "Gain", "GainAbs")
    # trigger: the frame start trigger (FrameStart; AcquisitionStart on a few old models)
    if f.has("TriggerSelector"):
        s.enum("trigger", ("FrameStart", "AcquisitionStart"), "TriggerSelector")
    if cfg.trigger == "free_run":
        if f.has("TriggerMode"):
            s.enum("trigger", "Off", "TriggerMode")
        rate_on = first_feature(f, "AcquisitionFrameRateEnable")
        if rate_on is not None and f.writable(rate_on):
            f.set(rate_on, True)
        s.number("fps", cam.fps, "AcquisitionFrameRate", "AcquisitionFrameRateAbs")
    else:
        s.enum("trigger", "On", "TriggerMode")
        if cfg.trigger == "software":
            s.enum("trigger", "Software", "TriggerSource")
        else:
            s.enum("trigger_line", cfg.trigger_line, "TriggerSource")
            s.enum("trigger_edge", EDGES[cfg.trigger_edge], "TriggerActivation")
            if cfg.trigger_delay_us or first_feature(f, "TriggerDelay", "TriggerDelayAbs"):
                s.number("trigger_delay_us", cfg.trigger_delay_us, "TriggerDelay", "TriggerDelayAbs")
        rate_on = first_feature(f, "AcquisitionFrameRateEnable")
        if rate_on is not None and f.writable(rate_on):  # the trigger sets the pace
            f.set(rate_on, False)
    if cfg.packet_size is not None:
        s.number("packet_size", cfg.packet_size, "GevSCPSPacketSize", integer=True)
    if cfg.inter_packet_delay is not None:
        s.number("inter_packet_delay", cfg.inter_packet_delay, "GevSCPD", integer=True)
    return read_settings(f)


def read_settings(f: Features) -> dict[str, Any]:
    """The settings knitwatch manages as the camera reports them now (None: the camera has no such feature)."""

    def value(*names: str) -> Any:  # noqa: ANN401
        name = first_feature(f, *names)
        return f.get(name) if name is not None else None

    mode = value("TriggerMode")
    source = value("TriggerSource")
    trigger = "free_run" if mode in (None, "Off") else ("software" if source == "Software" else "line")
    return {
        "pixel_format": value("PixelFormat"),
        "width": value("Width"),
        "height": value("Height"),
        "offset_x": value("OffsetX"),
        "offset_y": value("OffsetY"),
        "exposure_us": value("ExposureTime", "ExposureTimeAbs"),
        "gain_db": value("Gain", "GainAbs"),
        "trigger": trigger,
        "trigger_source": source if trigger == "line" else None,
        "trigger_edge": value("TriggerActivation") if trigger == "line" else None,
        "trigger_delay_us": value("TriggerDelay", "TriggerDelayAbs") if trigger == "line" else None,
        "frame_rate": value("AcquisitionFrameRate", "AcquisitionFrameRateAbs") if trigger == "free_run" else None,
        "packet_size": value("GevSCPSPacketSize"),
        "inter_packet_delay": value("GevSCPD"),
    }


def read_temperature(f: Features) -> float | None:
    name = first_feature(f, *TEMPERATURE_FEATURES)
    if name is None:
        return None
    try:
        return round(float(f.get(name)), 1)
    except Exception:  # noqa: BLE001 - a temperature is a nicety
        return None


class GrabStats:
    """What an industrial source counts across reconnects: frames, incomplete frames, frames the camera
    made that never arrived (gaps in its frame/block ids), disconnects, measured frame and trigger rates."""

    def __init__(self) -> None:
        self.grabbed = 0
        self.incomplete = 0
        self.skipped = 0  # block ids that never arrived (overwritten or lost on the link)
        self.timeouts = 0
        self.disconnects = 0
        self.triggers = 0  # software triggers sent
        self.last_block: int | None = None
        self.times: deque[tuple[float, int]] = deque(maxlen=64)  # (monotonic time, block id) of good frames
        self.trigger_times: deque[float] = deque(maxlen=64)

    def frame(self, block_id: int | None) -> None:
        now = time.monotonic()
        self.grabbed += 1
        if block_id is not None:
            if self.last_block is not None and block_id > self.last_block + 1:
                self.skipped += block_id - self.last_block - 1
            self.last_block = block_id
            self.times.append((now, block_id))
        else:
            self.times.append((now, self.grabbed))

    def trigger(self) -> None:
        self.triggers += 1
        self.trigger_times.append(time.monotonic())

    def restart(self) -> None:
        """A new connection: block ids start again."""
        self.last_block = None
        self.times.clear()

    def rates(self) -> dict[str, float | None]:
        fr = cr = None
        if len(self.times) >= 2:
            (t0, b0), (t1, b1) = self.times[0], self.times[-1]
            if t1 > t0:
                fr = round((len(self.times) - 1) / (t1 - t0), 2)
                cr = round((b1 - b0) / (t1 - t0), 2)  # frames the camera started (each trigger one), delivered or not
        tr = None
        if len(self.trigger_times) >= 2 and self.trigger_times[-1] > self.trigger_times[0]:
            tr = round((len(self.trigger_times) - 1) / (self.trigger_times[-1] - self.trigger_times[0]), 2)
        return {"frame_rate": fr, "camera_rate": cr, "trigger_rate": tr if tr is not None else cr}


# ------------------------------------------------------------------------------------ harvesters


class _HarvesterFeatures:
    """:class:`Features` over a harvesters node map (the ``genicam`` package's GenApi nodes)."""

    def __init__(self, node_map: Any) -> None:  # noqa: ANN401
        from genicam import genapi

        self.nm = node_map
        self.modes = genapi.EAccessMode

    def _node(self, name: str) -> Any:  # noqa: ANN401
        try:
            return self.nm.get_node(name)
        except Exception:  # noqa: BLE001 - no such node
            return None

    def _mode(self, name: str) -> Any:  # noqa: ANN401
        node = self._node(name)
        try:
            return node.get_access_mode() if node is not None else None
        except Exception:  # noqa: BLE001
            return None

    def has(self, name: str) -> bool:
        return self._mode(name) in (self.modes.RO, self.modes.RW)

    def writable(self, name: str) -> bool:
        return self._mode(name) in (self.modes.WO, self.modes.RW)

    def get(self, name: str) -> Any:  # noqa: ANN401
        return self._node(name).value

    def set(self, name: str, value: Any) -> None:  # noqa: ANN401
        self._node(name).value = value

    def limits(self, name: str) -> tuple[float, float, float] | None:
        return node_limits(self._node(name), "min", "max", "inc", "value")

    def choices(self, name: str) -> list[str] | None:
        return node_choices(self._node(name), "symbolics")

    def execute(self, name: str) -> None:
        self._node(name).execute()


def _device_fields(d: Any) -> dict[str, str]:  # noqa: ANN401 - a harvesters DeviceInfo
    def field(name: str) -> str:
        try:
            return str(getattr(d, name, "") or "")
        except Exception:  # noqa: BLE001 - a producer without that info
            return ""

    return {"model": field("model"), "serial": field("serial_number"), "user_id": field("user_defined_name"),
            "interface": field("tl_type"), "vendor": field("vendor")}


def list_gentl_cameras(producer: Path) -> list[dict[str, str]]:
    """Every camera a GenTL producer sees: model, serial, interface (for ``knitwatch cameras list``)."""
    from harvesters.core import Harvester

    h = Harvester()
    try:
        h.add_file(str(producer), check_existence=True, check_validity=True)
        h.update()
        return [{"sdk": "genicam", **_device_fields(d)} for d in h.device_info_list]
    finally:
        h.reset()


class GenICamSource:
    """A GenICam camera through ``harvesters`` and the vendor's GenTL producer (``industrial.gentl_producer``).

    Settings and counters as the ``pylon`` source; incomplete frames are counted from harvesters'
    incomplete-buffer event, lost ones from gaps in the buffers' frame ids (GenTL has no standard
    statistics node)."""

    def __init__(self, cam: CameraConfig) -> None:
        self.cam = cam
        self.cfg: IndustrialCameraConfig = cam.industrial
        self.live = cam.industrial.trigger != "software"
        self.truth: dict | None = None
        self.model = ""
        self.serial = ""
        self.settings: dict[str, Any] = {}
        self.counts = GrabStats()
        self._h: Any = None
        self._ia: Any = None
        self._features: _HarvesterFeatures | None = None
        self._temperature: tuple[float, float | None] = (0.0, None)

    def open(self) -> None:
        try:
            from harvesters.core import Callback, Harvester, ImageAcquirer
        except ImportError:
            raise SourceError("source 'genicam' needs harvesters: pip install 'knitwatch[cameras]'") from None
        producer = self.cfg.gentl_producer
        if producer is None or not Path(producer).is_file():
            raise CameraSettingError(f"camera {self.cam.id}: industrial.gentl_producer {producer} is not a file")
        counts = self.counts

        class _Incomplete(Callback):
            def emit(self, context: object | None = None) -> None:
                counts.incomplete += 1

        h = Harvester()
        try:
            h.add_file(str(producer), check_existence=True, check_validity=True)
            h.update()
            infos = [_device_fields(d) for d in h.device_info_list]
            want = self.cfg.device
            matches = [i for i, d in enumerate(infos) if not want or want in (d["serial"], d["user_id"])]
            if len(matches) != 1:
                found = ", ".join(f"{d['model']} {d['serial']}" for d in infos) or "none"
                what = (f"no camera with serial or user id {want!r}" if want else
                        "industrial.device is empty, so exactly one camera must be found")
                raise CameraSettingError(f"camera {self.cam.id}: {what} ({Path(producer).name} sees: {found})")
            self.model, self.serial = infos[matches[0]]["model"], infos[matches[0]]["serial"]
            ia = h.create(matches[0])
            ia.num_buffers = self.cfg.buffers
            ia.add_callback(ImageAcquirer.Events.INCOMPLETE_BUFFER, _Incomplete())
            f = _HarvesterFeatures(ia.remote_device.node_map)
            self.settings = apply_settings(f, self.cam, self.model)
            ia.start()
        except CameraSettingError:
            h.reset()
            raise
        except Exception as e:  # noqa: BLE001 - any SDK failure while opening: the camera is not usable now
            h.reset()
            raise SourceError(f"camera {self.cam.id}: {Path(producer).name}: {first_line(e)}") from None
        self._h, self._ia, self._features = h, ia, f
        self.counts.restart()

    def read(self) -> np.ndarray | None:
        if self._ia is None or self._features is None:
            raise SourceError("source is not open")
        try:
            if self.cfg.trigger == "software":
                self._features.execute("TriggerSoftware")
                self.counts.trigger()
            buf = self._ia.try_fetch(timeout=self.cfg.frame_timeout_ms / 1000)
            if buf is None:
                self.counts.timeouts += 1
                return None
            with buf:
                comp = buf.payload.components[0]
                try:
                    block: int | None = int(buf.module.frame_id)
                except Exception:  # noqa: BLE001 - a producer without frame ids
                    block = None
                img = np.array(comp.data, copy=True).reshape(comp.height, -1)
                fmt = str(comp.data_format)
        except Exception as e:  # noqa: BLE001 - a broken link/removed device: the capture stage reconnects
            self.counts.disconnects += 1
            raise SourceError(f"camera {self.cam.id} ({self.model} {self.serial}) failed: {first_line(e)}") from None
        self.counts.frame(block)
        self.truth = None if block is None else {"frame_counter": block}  # the camera's frame counter
        return to_image(img, fmt)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._features is not None and now - self._temperature[0] > 5.0:
            self._temperature = (now, read_temperature(self._features))
        c = self.counts
        return {"sdk": "genicam", "model": self.model, "serial": self.serial, "temperature_c": self._temperature[1],
                "grabbed": c.grabbed, "incomplete": c.incomplete, "lost": c.skipped, "timeouts": c.timeouts,
                "disconnects": c.disconnects, "triggers": c.triggers, **c.rates()}

    def close(self) -> None:
        ia, h = self._ia, self._h
        self._ia = self._h = self._features = None
        if ia is not None:
            quietly(ia.stop)
            quietly(ia.destroy)
        if h is not None:
            quietly(h.reset)


def quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001, S110 - closing a camera that is gone
        pass
