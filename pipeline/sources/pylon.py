"""Basler cameras (GigE Vision, USB3 Vision, the pylon camera emulator) through Basler's ``pypylon``.

The camera is found by serial number or user-defined name (``industrial.device``), its settings are
written and read back (:func:`knitwatch.pipeline.sources.genicam.apply_settings`), and it grabs with
pylon's "latest image only" strategy: a frame that waited while a newer one arrived is overwritten in
the SDK (counted from the gaps in the block ids as ``lost``), so the capture stage always gets the
newest frame. ``read`` waits at most ``frame_timeout_ms``; a removed camera (pylon's device-removal
notice) or a broken link raises :class:`SourceError` and the capture stage reconnects with back-off.
Counters survive reconnects: the stream grabber's statistics (incomplete buffers, buffer underruns,
failed packets, resends) are summed over every connection.

The pylon camera emulator (environment ``PYLON_CAMEMU=N``: N emulated cameras, serials 0815-0000 ...)
streams the images of a folder with ``industrial.emulator_images``: the tests and demos use it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import structlog

from knitwatch.config.settings import CameraConfig
from knitwatch.pipeline.sources.base import SourceError
from knitwatch.pipeline.sources.genicam import (
    CameraSettingError,
    GrabStats,
    apply_settings,
    first_line,
    node_choices,
    node_limits,
    quietly,
    read_temperature,
    to_image,
)

log = structlog.get_logger(__name__)

EMULATOR_CLASS = "BaslerCamEmu"
# the stream grabber's counters (GigE has all of them; USB and the emulator a few)
SDK_COUNTERS = {
    "Statistic_Total_Buffer_Count": "buffers",
    "Statistic_Failed_Buffer_Count": "failed_buffers",
    "Statistic_Buffer_Underrun_Count": "buffer_underruns",
    "Statistic_Failed_Packet_Count": "failed_packets",
    "Statistic_Resend_Request_Count": "resend_requests",
    "Statistic_Resynchronization_Count": "resynchronizations",
}


def _pylon() -> Any:  # noqa: ANN401 - the pypylon module
    try:
        from pypylon import pylon
    except ImportError:
        raise SourceError("source 'pylon' needs pypylon: pip install 'knitwatch[cameras]'") from None
    return pylon


class PylonFeatures:
    """:class:`~knitwatch.pipeline.sources.genicam.Features` over a pypylon node map."""

    def __init__(self, node_map: Any) -> None:  # noqa: ANN401
        from pypylon import genicam

        self.nm = node_map
        self.genicam = genicam

    def _node(self, name: str) -> Any:  # noqa: ANN401
        try:
            return self.nm.GetNode(name)
        except Exception:  # noqa: BLE001 - no such node
            return None

    def has(self, name: str) -> bool:
        node = self._node(name)
        try:
            return node is not None and bool(self.genicam.IsReadable(node))
        except Exception:  # noqa: BLE001 - a placeholder of a missing node
            return False

    def writable(self, name: str) -> bool:
        node = self._node(name)
        try:
            return node is not None and bool(self.genicam.IsWritable(node))
        except Exception:  # noqa: BLE001
            return False

    def get(self, name: str) -> Any:  # noqa: ANN401
        return self._node(name).Value

    def set(self, name: str, value: Any) -> None:  # noqa: ANN401
        self._node(name).Value = value

    def limits(self, name: str) -> tuple[float, float, float] | None:
        return node_limits(self._node(name), "Min", "Max", "Inc", "Value")

    def choices(self, name: str) -> list[str] | None:
        return node_choices(self._node(name), "Symbolics")

    def execute(self, name: str) -> None:
        self._node(name).Execute()


def device_fields(info: Any) -> dict[str, str]:  # noqa: ANN401 - a pylon CDeviceInfo
    def field(getter: str) -> str:
        try:
            return str(getattr(info, getter)())
        except Exception:  # noqa: BLE001 - not every transport has every property
            return ""

    return {"sdk": "pylon", "model": field("GetModelName"), "serial": field("GetSerialNumber"),
            "user_id": field("GetUserDefinedName"), "interface": field("GetDeviceClass"),
            "vendor": field("GetVendorName"), "address": field("GetIpAddress")}


def list_pylon_cameras() -> list[dict[str, str]]:
    """Every camera pylon sees (GigE, USB, emulated): model, serial, user id, interface."""
    pylon = _pylon()
    return [device_fields(d) for d in pylon.TlFactory.GetInstance().EnumerateDevices()]


class PylonSource:
    """A Basler camera (``source = "pylon"``); settings in ``[cameras.industrial]``."""

    def __init__(self, cam: CameraConfig) -> None:
        self.cam = cam
        self.cfg = cam.industrial
        # software trigger: the capture stage paces the reads at fps and each read triggers one frame
        self.live = cam.industrial.trigger != "software"
        self.truth: dict | None = None  # {"frame_counter": the block id} of the last frame
        self.model = ""
        self.serial = ""
        self.interface = ""
        self.settings: dict[str, Any] = {}  # as read back from the camera after they were written
        self.counts = GrabStats()
        self.sdk_totals: dict[str, int] = dict.fromkeys(SDK_COUNTERS.values(), 0)  # closed connections
        self._cam: Any = None
        self._features: PylonFeatures | None = None
        self._temperature: tuple[float, float | None] = (0.0, None)

    # -- opening
    def _find(self, pylon: Any) -> Any:  # noqa: ANN401
        want = self.cfg.device
        infos = list(pylon.TlFactory.GetInstance().EnumerateDevices())
        fields = [device_fields(d) for d in infos]
        matches = [i for i, d in enumerate(fields) if not want or want in (d["serial"], d["user_id"])]
        if len(matches) == 1:
            return infos[matches[0]]
        found = ", ".join(f"{d['model']} {d['serial']}" + (f" ({d['user_id']})" if d["user_id"] else "")
                          for d in fields) or "none"
        if want:
            raise CameraSettingError(f"camera {self.cam.id}: industrial.device {want!r}: no camera with this serial "
                                     f"number or user id (pylon sees: {found})")
        raise CameraSettingError(f"camera {self.cam.id}: industrial.device is empty, so exactly one camera must be "
                                 f"found (pylon sees: {found}); set the serial number")

    def open(self) -> None:
        pylon = _pylon()
        info = self._find(pylon)
        fields = device_fields(info)
        self.model, self.serial, self.interface = fields["model"], fields["serial"], fields["interface"]
        cam = None
        try:
            cam = pylon.InstantCamera(pylon.TlFactory.GetInstance().CreateDevice(info))
            cam.Open()
            features = PylonFeatures(cam.GetNodeMap())
            if self.cfg.emulator_images is not None:
                self._emulator_images(features)
            self.settings = apply_settings(features, self.cam, f"{self.model} {self.serial}")
            cam.MaxNumBuffer.Value = self.cfg.buffers
            cam.StartGrabbing(pylon.GrabStrategy_LatestImageOnly)
        except CameraSettingError:
            _close(cam)
            raise
        except Exception as e:  # noqa: BLE001 - any SDK failure while opening: not usable now (retried)
            _close(cam)
            raise SourceError(f"camera {self.cam.id} ({self.model} {self.serial}): {first_line(e)}") from None
        self._cam, self._features = cam, features
        self.counts.restart()
        log.info("camera open", camera=self.cam.id, model=self.model, serial=self.serial, interface=self.interface,
                 settings=self.settings)

    def _emulator_images(self, f: PylonFeatures) -> None:
        folder = self.cfg.emulator_images
        if self.interface != EMULATOR_CLASS:
            raise CameraSettingError(f"camera {self.cam.id}: industrial.emulator_images is for the pylon camera "
                                     f"emulator only, not {self.model} {self.serial} ({self.interface})")
        if folder is None or not folder.is_dir():
            raise CameraSettingError(f"camera {self.cam.id}: industrial.emulator_images {folder} is not a folder")
        f.set("ImageFilename", str(folder))
        f.set("ImageFileMode", "On")
        if f.writable("TestImageSelector"):
            f.set("TestImageSelector", "Off")

    # -- grabbing
    def read(self) -> np.ndarray | None:
        cam = self._cam
        if cam is None or self._features is None:
            raise SourceError("source is not open")
        pylon = _pylon()
        deadline = time.monotonic() + self.cfg.frame_timeout_ms / 1000
        try:
            if cam.IsCameraDeviceRemoved():
                raise SourceError("the camera was removed (unplugged, powered off or its link broke)")
            if self.cfg.trigger == "software":
                if cam.WaitForFrameTriggerReady(self.cfg.frame_timeout_ms, pylon.TimeoutHandling_Return):
                    cam.ExecuteSoftwareTrigger()
                    self.counts.trigger()
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    self.counts.timeouts += 1
                    return None
                res = cam.RetrieveResult(left_ms, pylon.TimeoutHandling_Return)
                if not res.IsValid():  # the frame timeout passed without a frame
                    self.counts.timeouts += 1
                    return None
                try:
                    if res.GrabSucceeded():
                        block = int(res.BlockID)
                        img = to_image(res.GetArray(), self.settings.get("pixel_format") or self.cfg.pixel_format)
                        self.counts.frame(block)
                        self.truth = {"frame_counter": block}  # the camera's frame counter (position 'trigger')
                        return img
                    self.counts.incomplete += 1  # an incomplete frame: try the next within the timeout
                finally:
                    res.Release()
        except SourceError as e:
            self.counts.disconnects += 1
            raise SourceError(f"camera {self.cam.id} ({self.model} {self.serial}): {e}") from None
        except Exception as e:  # noqa: BLE001 - the SDK's errors once open: the link or the camera is gone
            self.counts.disconnects += 1
            raise SourceError(f"camera {self.cam.id} ({self.model} {self.serial}) failed: {first_line(e)}") from None

    # -- reporting
    def sdk_counters(self) -> dict[str, int]:
        """The stream grabber's statistics summed over every connection."""
        out = dict(self.sdk_totals)
        if self._cam is not None:
            for name, value in self._read_sdk().items():
                out[name] += value
        return out

    def _read_sdk(self) -> dict[str, int]:
        got: dict[str, int] = {}
        try:
            sg = PylonFeatures(self._cam.GetStreamGrabberNodeMap())
        except Exception:  # noqa: BLE001 - a camera in the middle of going away
            return got
        for node, name in SDK_COUNTERS.items():
            if sg.has(node):
                try:
                    got[name] = int(sg.get(node))
                except Exception:  # noqa: BLE001, S112
                    continue
        return got

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._features is not None and now - self._temperature[0] > 5.0:
            try:
                self._temperature = (now, read_temperature(self._features))
            except Exception:  # noqa: BLE001 - a removed camera: no temperature
                self._temperature = (now, None)
        c = self.counts
        sdk = self.sdk_counters()
        return {"sdk": "pylon", "model": self.model, "serial": self.serial, "interface": self.interface,
                "temperature_c": self._temperature[1], "grabbed": c.grabbed, "incomplete": c.incomplete,
                "lost": c.skipped, "buffer_underruns": sdk["buffer_underruns"], "timeouts": c.timeouts,
                "disconnects": c.disconnects, "triggers": c.triggers, "expected_rate": self.cam.fps, **c.rates(),
                "sdk_counters": sdk}

    def close(self) -> None:
        cam, self._cam, self._features = self._cam, None, None
        if cam is None:
            return
        if not _removed(cam):
            for name, value in self._read_sdk_of(cam).items():
                self.sdk_totals[name] += value
        _close(cam)

    def _read_sdk_of(self, cam: Any) -> dict[str, int]:  # noqa: ANN401
        self._cam = cam
        try:
            return self._read_sdk()
        finally:
            self._cam = None

    # -- for tests and set-up tools
    @property
    def features(self) -> PylonFeatures | None:
        """The open camera's features (None when closed)."""
        return self._features


def _removed(cam: Any) -> bool:  # noqa: ANN401
    try:
        return bool(cam.IsCameraDeviceRemoved())
    except Exception:  # noqa: BLE001
        return True


def _close(cam: Any) -> None:  # noqa: ANN401
    if cam is None:
        return
    quietly(cam.StopGrabbing)
    quietly(cam.Close)
    quietly(cam.DestroyDevice)  # frees the device so that a reconnect can open it again
