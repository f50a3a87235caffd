"""The one settings schema of the knitwatch daemon.

Sources, in increasing priority:

1. built-in defaults (the field defaults below),
2. a TOML file: ``--config PATH``, else ``/etc/knitwatch/knitwatch.toml`` when it exists,
3. environment variables ``KNITWATCH_<SECTION>__<KEY>`` (for example ``KNITWATCH_API__PORT=9000``;
   list sections such as ``cameras`` take JSON: ``KNITWATCH_CAMERAS='[{"id": "cam1"}]'``).

Unknown keys are errors everywhere (``extra="forbid"``), so a typo never silently falls back to a
default. :func:`load_settings` raises :class:`ConfigError` with one :class:`ConfigProblem` per
problem (key path, value, message); the CLI prints them and exits with code 2.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("/etc/knitwatch/knitwatch.toml")
ENV_PREFIX = "KNITWATCH_"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and no
    float setting takes ``inf`` or ``nan`` (``allow_inf_nan=False``: an infinite retention or a
    ``nan`` threshold is an error with its key, never a crash loop or a silent blind spot)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ScheduledDefectConfig(Section):
    """A defect the simulator puts on the fabric at a given frame (for demos, tests, benchmarks)."""

    kind: Literal["hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly"]
    frame: int = Field(ge=0)
    every_revolution: bool = False
    size: float = Field(1.0, gt=0, le=20)
    intensity: float = Field(1.0, gt=0, le=5)


class SimulatorConfig(Section):
    """The built-in knitted-fabric simulator used as a camera (``source = "simulator"``)."""

    texture: Literal["jersey", "pique"] = "jersey"
    pitch_px: float = Field(6.0, ge=2.0, le=64.0, description="loop (wale) pitch in pixels")
    speed_px: float = Field(40.0, gt=0, le=1000, description="sideways web movement per frame")
    revolution_frames: int = Field(200, ge=2, description="frames per machine revolution")
    brightness: float = Field(128.0, ge=10, le=245)
    random_defect_rate: float = Field(0.0, ge=0, le=1, description="chance per frame of a new defect")
    defects: list[ScheduledDefectConfig] = Field(default_factory=list)
    seed: int = 0
    change_frame: int | None = Field(
        None, ge=1, description="the machine changes article at this frame: from it on the fabric is "
        "change_texture (at change_pitch_px, change_brightness); scheduled defects from this frame on are on the new "
        "fabric"
    )
    change_texture: Literal["jersey", "pique"] = "pique"
    change_pitch_px: float | None = Field(None, ge=2.0, le=64.0, description="the new article's loop pitch "
                                          "(default: pitch_px)")
    change_brightness: float | None = Field(None, ge=10, le=245, description="the new article's mean gray level "
                                            "(another yarn; default: brightness)")


class PositionPlcConfig(Section):
    """Where the machine's PLC keeps its revolution counter (and optionally the tube angle): Modbus TCP
    holding registers, read by a thread of the capture process (a slow PLC never holds up frames)."""

    host: str = Field("127.0.0.1", description="the PLC's address")
    port: int = Field(502, ge=1, le=65535, description="Modbus TCP port")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (device) id")
    revolution_register: int = Field(100, ge=0, le=65535, description="holding register of the revolution counter")
    revolution_words: Literal[1, 2] = Field(
        1, description="1: a 16-bit counter; 2: a 32-bit counter in two registers, high word first")
    angle_register: int | None = Field(
        None, ge=0, le=65535,
        description="holding register of the tube angle (0 .. angle_full_scale); none: the offset within a "
        "revolution comes from the image displacement since the counter last counted")
    angle_full_scale: int = Field(3600, ge=2, le=65536, description="angle register value of one full revolution")
    poll_s: float = Field(0.05, gt=0, le=10, description="read the registers this often")
    timeout_s: float = Field(0.5, gt=0, le=30, description="connect/response timeout of one read")
    stale_s: float = Field(1.0, gt=0, le=600, description="values older than this make the position unreliable")

    @model_validator(mode="after")
    def _distinct(self) -> PositionPlcConfig:
        used = set(range(self.revolution_register, self.revolution_register + self.revolution_words))
        if self.angle_register is not None and self.angle_register in used:
            raise ValueError(f"angle_register {self.angle_register} overlaps the revolution counter's register(s)")
        return self


class PositionConfig(Section):
    """Where each frame lies on the fabric tube (revolution and offset within it), sent with every frame
    as ``pos``. ``image``: measured from the frames (phase correlation of consecutive frames, the cutline
    counted as the once-per-revolution mark); ``plc``: the machine's revolution counter (``[..plc]``);
    ``trigger``: the camera's frame counter, one frame every 360/``frames_per_revolution`` degrees;
    ``simulator``: the simulator's truth (tests, benchmarks); ``none``: not computed."""

    source: Literal["none", "image", "simulator", "plc", "trigger"] = Field(
        "image", description="where the position comes from")
    circumference_px: float | None = Field(
        None, gt=0, le=1e9,
        description="frame pixels per revolution, when known; image: the start value (refined at each cutline); "
        "plc: used instead of learning it from the image displacement over a revolution")
    min_peak: float = Field(
        0.15, gt=0, le=1, description="image: a correlation peak below this is not a measurement (ok = false)")
    work_width: int = Field(
        2048, ge=64, le=16384,
        description="image: wider frames are shrunk horizontally by an integer factor first (keep 3 or more "
        "work pixels per loop)")
    work_rows: int = Field(64, ge=8, le=1024, description="image: rows are averaged down to this many first")
    pitch_px: float | None = Field(
        None, ge=2, le=64, description="image: the loop (wale) pitch in pixels; none: measured from the frames")
    cutline_needle_spacing: int = Field(
        5, ge=0, le=32,
        description="image: the two needles left out at the cutline are this many needle pitches apart "
        "(the simulator: 5); 0: a single needle left out")
    cutline_min_depth: float = Field(
        0.18, gt=0, le=1,
        description="image: how much darker than the other gaps between wales (a fraction of the fabric's local "
        "brightness) the cutline's gaps must be")
    plc: PositionPlcConfig = PositionPlcConfig()
    frames_per_revolution: int | None = Field(
        None, ge=1, le=1_000_000,
        description="trigger: frames per revolution (the camera's trigger fires every 360/N degrees of the "
        "cylinder); required for source 'trigger'")

    @model_validator(mode="after")
    def _trigger_needs_frames(self) -> PositionConfig:
        if self.source == "trigger" and self.frames_per_revolution is None:
            raise ValueError("frames_per_revolution is required for position source 'trigger' (the hardware "
                             "trigger fires every 360/N degrees of the cylinder: set N)")
        return self


# pixel formats knitwatch takes from a GenICam camera (8 bits a channel); Bayer frames are converted to BGR
INDUSTRIAL_PIXEL_FORMATS = ("Mono8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8", "RGB8", "BGR8")


class IndustrialCameraConfig(Section):
    """A GenICam camera: ``source = "pylon"`` (Basler's pylon SDK, pypylon) or ``"genicam"`` (any GenTL
    producer, through harvesters). A setting left unset (none) keeps the camera's own value. Settings are
    written when the camera opens (again after a reconnect) and read back; a value the camera cannot take
    is an error that names the camera and the setting."""

    device: str = Field(
        "", max_length=128,
        description="the camera's serial number or user-defined name (DeviceUserID); empty: the only camera found")
    pixel_format: Literal["Mono8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8", "RGB8", "BGR8"] = Field(
        "Mono8", description="Mono8 (gray); Bayer*8 and RGB8 are converted to BGR")
    exposure_us: float | None = Field(None, gt=0, le=1e8, description="exposure time in microseconds")
    gain_db: float | None = Field(None, ge=-50, le=100, description="gain in dB (auto gain is switched off)")
    width: int | None = Field(None, ge=1, le=65535, description="sensor ROI width in pixels")
    height: int | None = Field(None, ge=1, le=65535, description="sensor ROI height in pixels")
    offset_x: int | None = Field(None, ge=0, le=65535, description="sensor ROI left edge")
    offset_y: int | None = Field(None, ge=0, le=65535, description="sensor ROI top edge")
    trigger: Literal["free_run", "software", "line"] = Field(
        "free_run",
        description="free_run: the camera runs at the camera's fps; software: knitwatch triggers each frame at fps; "
        "line: a hardware trigger input (e.g. the machine's encoder), fps is the expected trigger rate")
    trigger_line: str = Field("Line1", pattern=r"^Line[0-9]{1,2}$", description="line: the input line")
    trigger_edge: Literal["rising", "falling", "any"] = Field("rising", description="line: the edge that triggers")
    trigger_delay_us: float = Field(0.0, ge=0, le=1e7, description="line: delay from the edge to the exposure")
    packet_size: int | None = Field(None, ge=220, le=16404, description="GigE: packet size in bytes (jumbo: 8192+)")
    inter_packet_delay: int | None = Field(
        None, ge=0, le=10_000_000,
        description="GigE: delay between packets in camera ticks (several cameras on one link)")
    frame_timeout_ms: int = Field(
        1000, ge=10, le=10_000,
        description="a read waiting longer than this returns no frame (counted as a stall; the capture stage's "
        "heartbeats wait for it, so keep it well under [daemon] stall_s)")
    buffers: int = Field(8, ge=2, le=256, description="grab buffers of the SDK")
    emulator_images: Path | None = Field(
        None, description="pylon camera emulator only (PYLON_CAMEMU=N): stream this folder's images (tests, demos)")
    gentl_producer: Path | None = Field(None, description="genicam: the camera vendor's GenTL producer file (.cti)")


class CameraConfig(Section):
    """One camera: where frames come from."""

    id: str = Field("cam0", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    source: Literal["simulator", "opencv", "folder", "pylon", "genicam"] = "simulator"
    uri: str = Field(
        "",
        description="opencv: device index, file, RTSP/HTTP URL or GStreamer pipeline; folder: a directory",
    )
    fps: float = Field(10.0, gt=0, le=240)
    width: int = Field(1280, ge=16, le=16384)
    height: int = Field(1024, ge=16, le=16384)
    loop: bool = Field(True, description="folder source: start again at the end")
    roi: tuple[int, int, int, int] | None = Field(None, description="x0, y0, x1, y1 in frame pixels")
    pixel_threshold: float | None = Field(None, description="overrides the checkpoint's pixel threshold")
    simulator: SimulatorConfig = SimulatorConfig()
    position: PositionConfig = PositionConfig()
    industrial: IndustrialCameraConfig = IndustrialCameraConfig()  # source "pylon" / "genicam"

    @model_validator(mode="after")
    def _source_needs_uri(self) -> CameraConfig:
        if self.source == "genicam" and self.industrial.gentl_producer is None:
            raise ValueError("source 'genicam' needs industrial.gentl_producer (the vendor's GenTL .cti file)")
        if self.source in ("opencv", "folder") and not self.uri:
            raise ValueError(f"source '{self.source}' needs 'uri'")
        if self.position.source == "simulator" and self.source != "simulator":
            raise ValueError(f"position source 'simulator' needs source 'simulator', not '{self.source}'")
        if self.roi is not None:
            x0, y0, x1, y1 = self.roi
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise ValueError(f"roi {self.roi} must satisfy 0 <= x0 < x1 and 0 <= y0 < y1")
        return self


class TilingConfig(Section):
    """Live tiling. Tile size, stride, normalisation and the scale policy come from the checkpoint
    (one preprocessing path); here only what is a property of the installation."""

    scale: float | None = Field(
        None,
        gt=0,
        le=16,
        description="fixed resize factor for all cameras; default: the checkpoint's (fixed, or measured "
        "from the loop pitch when the model was trained with a target pitch)",
    )
    pitch_refresh_frames: int = Field(50, ge=1, description="re-measure the loop pitch every N frames")


class ModelConfig(Section):
    checkpoint: Path | None = Field(None, description="model checkpoint (knitwatch train --out)")


class InferenceConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="auto: onnxruntime on a CPU when installed (faster there), torch on a GPU or without it",
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    max_batch_tiles: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(50.0, ge=0, le=10000)
    workers: int = Field(
        1, ge=0, le=64, description="inference worker processes started on this host (0: only remote workers)"
    )
    tiles_endpoint: str | None = Field(
        None, description="where the tiler offers tiles, e.g. tcp://0.0.0.0:5601 for workers on other hosts"
    )
    results_endpoint: str | None = Field(None, description="where the alert stage collects results, e.g. tcp://...")
    # CURVE security of tcp:// tiles/results endpoints (pipeline/security.py; keys: 'knitwatch keys generate')
    server_secret_key: Path | None = Field(
        None, description="the daemon's key pair (its NAME.key_secret file); required for tcp:// endpoints, which "
        "are then encrypted and admit only authorised workers (this host's own workers use this key pair)"
    )
    authorized_keys_dir: Path | None = Field(
        None, description="folder of the public NAME.key files of the workers on other hosts allowed to connect "
        "(re-read when a file is added or removed)"
    )
    worker_secret_key: Path | None = Field(
        None, description="'knitwatch worker': this worker's key pair (NAME.key_secret); its NAME.key belongs in "
        "the daemon's authorized_keys_dir"
    )
    server_public_key: Path | None = Field(
        None, description="'knitwatch worker': the daemon's public key file (the NAME.key of its server_secret_key)"
    )
    allow_insecure_tcp: bool = Field(
        False, description="allow tcp:// endpoints without keys: unencrypted, and any host that reaches them can "
        "take tiles and send results that stop the machine; only on an isolated, trusted network"
    )

    @field_validator("tiles_endpoint", "results_endpoint")
    @classmethod
    def _zmq_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "ipc://")):
            raise ValueError("must start with tcp:// or ipc://")
        return v


class DaemonConfig(Section):
    """The supervisor: where sockets live, how stages are watched and restarted."""

    runtime_dir: Path | None = Field(
        None, description="sockets; default $RUNTIME_DIRECTORY (systemd), else a private temp directory"
    )
    stats_interval_s: float = Field(5.0, gt=0, le=3600)
    stall_s: float = Field(10.0, gt=0, description="a stage silent this long is killed and restarted")
    startup_grace_s: float = Field(120.0, gt=0, description="time a stage may take to start (model loading)")
    max_restarts_per_minute: int = Field(5, ge=1)
    drain_s: float = Field(3.0, gt=0, description="per stage, time to finish in-flight frames at shutdown")
    coverage_warn: float = Field(0.95, ge=0, le=1, description="warn when inspected/captured falls below")


class SeverityClassConfig(Section):
    """One severity class of a confirmed defect. A class matches when one region of the frame is at
    least ``min_area_px`` large AND its peak score is at least ``min_peak_ratio`` times the image
    threshold; classes are tried in order and the first match decides the action."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    action: Literal["stop", "alarm", "log"]
    min_area_px: int = Field(0, ge=0, description="the region has at least this many pixels (frame pixels)")
    min_peak_ratio: float = Field(0.0, ge=0, description="the region's peak score / the image threshold")


def default_severity_classes() -> list[SeverityClassConfig]:
    return [
        SeverityClassConfig(name="major", action="stop", min_area_px=200),
        SeverityClassConfig(name="intense", action="stop", min_peak_ratio=2.0),
        SeverityClassConfig(name="minor", action="alarm"),
    ]


class AlertConfig(Section):
    confirm_k: int = Field(2, ge=1, description="a defect must be seen in k of the last n frames")
    confirm_n: int = Field(3, ge=1)
    min_area_px: int = Field(20, ge=1)
    cooldown_frames: int = Field(
        50, ge=0, le=100_000, description="a tracked defect unseen for up to this many frames and found again at "
        "its place is still the same defect (its event is updated, no new event); other defects are never held back"
    )
    track_gate_px: float = Field(
        64.0, gt=0, le=10_000, description="tracking: a region within this many pixels of a defect's place on the "
        "tube (columns, and rows) is that defect; regions of one frame this near each other are one defect "
        "(about one model tile in frame pixels: the pieces of one defect lie that far apart)"
    )
    track_gate_frame_px: float = Field(
        128.0, gt=0, le=100_000, description="tracking without a fabric position (frame coordinates): the column "
        "gate around a defect's predicted place; must exceed the web's motion between two inspected frames"
    )
    recurrence_stop_revolutions: int = Field(
        2, ge=0, le=1000, description="a defect back at the same tube columns in this many consecutive "
        "revolutions (a broken needle's line) becomes severity 'recurring' and stops the machine (0: never)"
    )
    recurrence_memory_revolutions: int = Field(
        3, ge=0, le=1000, description="a defect's place is remembered this many revolutions after it was last seen, "
        "to recognise it when it comes back (0: no recurrence); needs a fabric position with a circumference"
    )
    cutline_factor: float = Field(
        2.0, ge=0, le=1000, description="the cutline, learned as normal: a region at the cutline's tube columns is a "
        "defect only when its peak reaches this many times the cutline's learned normal peak (before one is "
        "learned: times the image threshold); 0: judge the cutline like any fabric. Needs a position that "
        "knows the cutline (image, simulator)"
    )
    cutline_margin_px: float = Field(
        32.0, ge=0, le=10_000, description="frame pixels either side of the cutline that count as the cutline"
    )
    cutline_memory_revolutions: int = Field(
        5, ge=1, le=1000, description="the cutline's normal peak is the median of its highest peaks in this many "
        "recent revolutions"
    )
    decisions_log: Path | None = Field(None, description="append every frame's decision as a JSON line (audit)")
    image_threshold: float | None = Field(None, description="overrides the checkpoint's image threshold")
    pixel_threshold: float | None = Field(None, description="overrides the checkpoint's pixel threshold")
    severity: list[SeverityClassConfig] = Field(
        default_factory=default_severity_classes,
        description="severity classes, first match wins; a confirmed defect matching none is only logged",
    )

    @model_validator(mode="after")
    def _k_le_n(self) -> AlertConfig:
        if self.confirm_k > self.confirm_n:
            raise ValueError(f"confirm_k ({self.confirm_k}) must not exceed confirm_n ({self.confirm_n})")
        names = [c.name for c in self.severity]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"severity class names must be unique, repeated: {', '.join(dup)}")
        return self


class PlcConfig(Section):
    """How a stop (and an alarm) reaches the machine. Stops latch until acknowledged (``knitwatch ack``)."""

    driver: Literal["log", "modbus", "opcua", "command"] = "log"
    # Modbus TCP
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (device) id")
    output: Literal["coil", "register"] = Field(
        "coil", description="modbus: write coils, or holding registers (stop_value / 0, heartbeat counts up)"
    )
    stop_address: int = Field(0, ge=0, le=65535, description="modbus: the stop coil/register (1 = stop)")
    alarm_address: int | None = Field(None, ge=0, le=65535, description="modbus: optional alarm coil/register")
    heartbeat_address: int | None = Field(1, ge=0, le=65535, description="modbus: heartbeat coil/register")
    stop_value: int = Field(1, ge=1, le=65535, description="modbus register mode: the value that means stop")
    timeout_s: float = Field(1.0, gt=0, le=30, description="connect/response timeout of one PLC request")
    # all drivers with outputs
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="toggle the heartbeat this often")
    heartbeat_idle_s: float = Field(
        10.0, ge=0, description="pause the heartbeat when no inspection result came for this long (0: never)"
    )
    retry_initial_s: float = Field(0.2, gt=0, le=60, description="first retry delay of an unconfirmed action")
    retry_max_s: float = Field(5.0, gt=0, le=600, description="retry delay doubles up to this")
    # OPC UA (pip install 'knitwatch[opcua]')
    opcua_url: str = Field("", description="e.g. opc.tcp://192.168.1.10:4840")
    opcua_stop_node: str = Field("", description="node id of a Boolean written True to stop, e.g. ns=2;s=Stop")
    opcua_alarm_node: str = ""
    opcua_heartbeat_node: str = ""
    # command
    command: list[str] = Field(default_factory=list, description="program and arguments for driver 'command'")
    command_timeout_s: float = Field(10.0, gt=0, le=600)
    # the doff signal (a new roll starts on its rising edge; read over Modbus TCP from host/port/unit_id
    # whatever the driver, by the alert stage)
    doff_address: int | None = Field(
        None, ge=0, le=65535, description="Modbus address of the doff signal: a new roll starts when it goes from 0 "
        "to non-zero (none: no doff signal)")
    doff_table: Literal["coil", "discrete_input", "holding_register", "input_register"] = Field(
        "coil", description="where the doff signal is: coil, discrete_input, holding_register or input_register")
    doff_poll_s: float = Field(0.2, gt=0, le=10, description="read the doff signal this often")

    @model_validator(mode="after")
    def _driver_needs(self) -> PlcConfig:
        if self.driver == "command" and not self.command:
            raise ValueError("driver 'command' needs 'command' (program and arguments)")
        if self.driver == "opcua" and not (self.opcua_url and self.opcua_stop_node):
            raise ValueError("driver 'opcua' needs 'opcua_url' and 'opcua_stop_node'")
        if self.driver == "modbus" and self.heartbeat_address is not None and self.heartbeat_address in (
            self.stop_address, self.alarm_address
        ):
            raise ValueError("heartbeat_address must differ from stop_address and alarm_address")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must not be below retry_initial_s")
        if self.doff_address is not None and self.doff_table == "coil" and self.doff_address in (
            self.stop_address, self.alarm_address, self.heartbeat_address
        ) and self.output == "coil":
            raise ValueError("doff_address must differ from the stop, alarm and heartbeat coils")
        return self


class RollConfig(Section):
    """Rolls and the roll report (``knitwatch roll``): the fabric's size for positions in metres and the
    points grade (4-point system, ASTM D5430 style). Unset values make the report say "not configured"
    for what needs them, never a guess."""

    machine: str = Field("", max_length=200, description="the machine's name on roll reports")
    fabric_width_m: float | None = Field(
        None, gt=0, le=20, description="width of the fabric as graded, in metres (tubular fabric: its open width, "
        "twice the flat tube's)")
    metres_per_revolution: float | None = Field(
        None, gt=0, le=10, description="fabric length knitted per machine revolution, in metres (courses per "
        "revolution = feeders, times the course length)")
    pixels_per_mm: float | None = Field(
        None, gt=0, le=1000, description="frame pixels per millimetre of fabric (defect lengths for the points)")
    four_point_severities: list[str] = Field(
        default_factory=list, description="severity classes counted as holes/openings: 4 points whatever their "
        "length")
    grade_a_max: float = Field(
        24.0, ge=0, le=100_000, description="grade A up to this many points per 100 m² (24 ~ 20 per 100 yd²)")
    grade_b_max: float = Field(
        48.0, ge=0, le=100_000, description="grade B up to this many points per 100 m² (48 ~ 40 per 100 yd²); "
        "above: C")

    @model_validator(mode="after")
    def _grades_ordered(self) -> RollConfig:
        if self.grade_b_max < self.grade_a_max:
            raise ValueError(f"grade_b_max ({self.grade_b_max:g}) must not be below grade_a_max "
                             f"({self.grade_a_max:g})")
        return self


class StoreConfig(Section):
    """The defect store: SQLite index ``events.sqlite3`` and image folders ``events/`` under ``path``."""

    path: Path = Path("/var/lib/knitwatch")
    retention_days: float = Field(30, gt=0, description="delete events older than this (except kept ones)")
    max_gb: float = Field(10.0, gt=0, description="delete the oldest events beyond this total size (except kept)")
    fsync: bool = Field(True, description="fsync image files before they count as written (power-loss safe)")
    thumbnail_px: int = Field(320, ge=32, le=2048, description="longer side of the thumbnail")
    latch_dir: Path | None = Field(
        None, description="folder of the latch file (latch.json) and the acknowledge mailbox, kept apart from the "
        "index so that a broken index never loses a latched stop; default: the store folder. Another file system "
        "than the pictures' keeps acknowledges working when that one is full or read-only"
    )


class LearnConfig(Section):
    """Learning a new fabric on the machine (``knitwatch learn``) and the per-article model library
    (``knitwatch model list|use|rollback``)."""

    library_dir: Path | None = Field(
        None, description="the model library: one folder per article with its versions, and the cameras' "
        "selection (active.json); default: <store.path>/models"
    )
    model: str = Field(
        "auto", description="model kind trained by 'learn train'; auto: msflow-efficientnet-lite0 on a CPU host, "
        "efficientad-s on a GPU host (see README 'Learning a new fabric')"
    )
    min_revolutions: int = Field(3, ge=2, le=1000, description="revolutions 'learn record' covers at least "
                                 "(whole revolutions are held back for validation)")
    validation_revolutions: int = Field(1, ge=1, le=100, description="whole revolutions held back from training "
                                        "to validate the new model")
    max_false_stops_per_hour: float = Field(
        1.0, ge=0, le=1e6, description="a new model whose estimated false stops per hour on the held-back frames "
        "exceed this is refused, not installed"
    )
    train_threads: int = Field(1, ge=1, le=256, description="CPU threads of the training process (inspection keeps "
                               "the rest)")
    train_nice: int = Field(10, ge=0, le=19, description="niceness of the training process")


API_TOKEN_MIN_CHARS = 16


def api_token_problem(token: str) -> str | None:
    """Why ``token`` (already stripped of surrounding blanks) cannot be the API's Bearer token, or None.
    The reason never repeats the token."""
    if len(token) < API_TOKEN_MIN_CHARS:
        return (f"must have at least {API_TOKEN_MIN_CHARS} characters (it has {len(token)}); "
                "make one with: openssl rand -hex 32")
    if not all("!" <= ch <= "~" for ch in token):
        return "must be printable ASCII without blanks (it is sent in an HTTP header)"
    return None


class ApiConfig(Section):
    """The HTTP API and web gallery served by the daemon (``/``, ``/api/...``, ``/healthz``, ``/metrics``).

    Loopback only by default. Any other address requires a token: clients send it as
    ``Authorization: Bearer <token>`` on ``/api/...`` and ``/metrics``; a token set while binding
    loopback is required all the same. ``/healthz`` and the page's static files need none."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)  # the token

    enabled: bool = Field(True, description="serve the API and the web page")
    host: str = Field("127.0.0.1", description="address to bind; not loopback requires token or token_file")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port, logged at start)")
    token: str | None = Field(None, description="Bearer token: at least 16 printable ASCII characters, no blanks "
                                                "(use a long random one: openssl rand -hex 32)")
    token_file: Path | None = Field(None, description="file holding the token (first line, same rules as token), "
                                                      "e.g. a systemd credential")

    @field_validator("token", mode="after")
    @classmethod
    def _strip_token(cls, v: str | None) -> str | None:
        return v.strip() if v is not None else None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ApiConfig:
        if self.token is not None:  # checked here, not in a field validator: errors then never print the value
            problem = api_token_problem(self.token)
            if problem:
                raise ValueError(f"token {problem}")
        if not _is_loopback(self.host) and not (self.token or self.token_file):
            raise ValueError(f"binding {self.host!r} (not loopback) requires 'token' or 'token_file'")
        if self.token and self.token_file:
            raise ValueError("set 'token' or 'token_file', not both")
        return self


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "console", "json"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("knitwatch_toml", default=None)


class Settings(BaseSettings):
    """Everything the daemon can be told. See ``config/knitwatch.example.toml``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    cameras: list[CameraConfig] = Field(default_factory=lambda: [CameraConfig()])
    tiling: TilingConfig = TilingConfig()
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    alert: AlertConfig = AlertConfig()
    daemon: DaemonConfig = DaemonConfig()
    plc: PlcConfig = PlcConfig()
    store: StoreConfig = StoreConfig()
    roll: RollConfig = RollConfig()
    learn: LearnConfig = LearnConfig()
    api: ApiConfig = ApiConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cams: list[CameraConfig]) -> list[CameraConfig]:
        if not cams:
            raise ValueError("at least one camera is required")
        ids = [c.id for c in cams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"camera ids must be unique, repeated: {', '.join(dup)}")
        return cams

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration."""

    key: str
    value: Any
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        if self.value is _MISSING:
            return f"{self.key}: {self.message}{where}"
        return f"{self.key} = {self.value!r}: {self.message}{where}"


_MISSING = object()


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` names each key and value."""

    def __init__(self, problems: list[ConfigProblem], path: Path | None = None) -> None:
        self.problems = problems
        self.path = path
        super().__init__("; ".join(str(p) for p in problems))


def resolve_config_path(path: Path | str | None) -> Path | None:
    """The TOML file to read: the given one, else the system default when it exists, else none."""
    if path is not None:
        return Path(path)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def _key_source(key: str, env: dict[str, str]) -> str:
    """Tell whether a key path was set by an environment variable (best effort, for messages)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        name = ENV_PREFIX + "__".join(p for p in parts[:n] if not p.isdigit()).upper()
        if name in env:
            return f"from environment variable {name}"
    return ""


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _unparsable_env(e: SettingsError) -> list[ConfigProblem]:
    """Name the environment variable(s) behind pydantic-settings' 'error parsing value for field'."""
    m = re.search(r'field "([^"]+)"', str(e))
    field_name = m.group(1) if m else "(environment)"
    prefix = (ENV_PREFIX + field_name).upper()
    cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
    found = [(k, v) for k, v in sorted(os.environ.items())
             if k.upper() == prefix or k.upper().startswith(prefix + "__")]
    found = [(k, v) for k, v in found if not _is_json(v)] or found
    if not found:
        return [ConfigProblem(field_name, _MISSING, f"cannot parse its environment value{cause}")]
    hint = f"lists and sections take JSON, e.g. {ENV_PREFIX}CAMERAS='[{{\"id\": \"cam1\"}}]'"
    return [ConfigProblem(name[len(ENV_PREFIX):].lower().replace("__", "."), value, f"not valid JSON{cause}; {hint}",
                          f"from environment variable {name}")
            for name, value in found]


def load_settings(path: Path | str | None = None, *, use_default_path: bool = True) -> Settings:
    """Load defaults < TOML file < environment. Raises :class:`ConfigError` on any problem."""
    toml = resolve_config_path(path) if use_default_path or path is not None else None
    if toml is not None:
        if not toml.is_file():
            raise ConfigError([ConfigProblem("--config", str(toml), "file not found")], toml)
        try:
            tomllib.loads(toml.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([ConfigProblem(str(toml), _MISSING, f"not valid TOML: {e}")], toml) from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError([ConfigProblem(str(toml), _MISSING, f"cannot read: {e}")], toml) from e
    unknown = [
        ConfigProblem(name, value, "unknown setting (sections: " + ", ".join(Settings.model_fields) + ")")
        for name, value in sorted(os.environ.items())
        if name.upper().startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in Settings.model_fields
    ]
    if unknown:
        raise ConfigError(unknown, toml)
    token = _toml_path.set(toml)
    try:
        return Settings()
    except SettingsError as e:  # an environment value that cannot be parsed (lists and sections take JSON)
        raise ConfigError(_unparsable_env(e), toml) from None
    except ValidationError as e:
        env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see config/knitwatch.example.toml)"
            value = err.get("input", _MISSING)
            if isinstance(value, dict):  # model-level errors carry the whole section: do not dump it
                value = _MISSING
            problems.append(ConfigProblem(key, value, msg, _key_source(key, env) or (str(toml) if toml else "")))
        raise ConfigError(problems, toml) from None
    finally:
        _toml_path.reset(token)
