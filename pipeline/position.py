"""Where each frame lies on the fabric tube: the revolution and the offset within it.

A circular knitting machine's fabric tube turns past the camera, once per revolution; the cutline
(needles left out) marks each revolution. The capture stage asks an estimator for every frame and
sends the answer with the frame as the header field ``pos``::

    {"rev": int,                      # revolution number (counts up from the start, >= 0)
     "offset_px": float,              # tube coordinate of the frame's column x = 0, in [0, circumference)
     "circumference_px": float|None,  # frame pixels per revolution; None until known
     "source": "image"|"plc"|"simulator",
     "ok": bool,                      # False: the estimate is unreliable for this frame
     "cutline_px": float|None}        # tube coordinate of the cutline, when known (an extra)

A region at frame column ``x`` lies at tube coordinate ``(offset_px + x) mod circumference_px``, the
same place on the fabric in every frame and revolution. While ``circumference_px`` is None,
``offset_px`` is the distance the fabric has moved since the first frame (unwrapped).

Estimators (one interface: ``update(frame, truth) -> pos``, ``stats()``, ``close()``):

* :class:`ImagePosition` - from the frames alone. Consecutive frames are phase-correlated (OpenCV
  DFTs of a row-averaged, high-passed, Hann-windowed grayscale copy: the fixed lighting gradient
  and vignette do not move with the fabric and are filtered out); the peak's sub-pixel position is
  the displacement, accumulated into the offset. A weak peak (a covered lens, a blank frame) is no
  measurement: the offset is carried on at the last speed, the frame is ``ok: false``, and the last
  good frame stays the reference, so the next good frame is measured against it. The cutline is
  found in the column profile as two narrow dark stripes ``cutline_needle_spacing`` loop pitches
  apart (the pitch is measured from the profile's spectrum unless configured); its first pass fixes
  its tube coordinate, its second the circumference, and every pass after that counts the
  revolution, re-anchors the offset (the accumulated drift is removed) and refines the circumference.
  The origin (tube coordinate 0) is the first frame's column 0.
* :class:`PlcPosition` - the machine's revolution counter (and optionally the tube angle) from PLC
  holding registers over Modbus TCP, read by a background thread; the offset comes from the angle
  register or else from the image displacement since the counter last counted, and the
  circumference from the setting or else from the image displacement over a whole revolution.
* :class:`SimulatorPosition` - the simulator's own truth (tests and benchmarks).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Protocol

import cv2
import numpy as np
import structlog

from knitwatch.config.settings import CameraConfig, PositionConfig, PositionPlcConfig

log = structlog.get_logger(__name__)

__all__ = [
    "ImagePosition",
    "PlcPosition",
    "PositionEstimator",
    "SimulatorPosition",
    "find_cutline",
    "make_position",
    "profile_period",
]

UNCERTAIN_OK_PX = 16.0  # frames are "ok" only while the dead-reckoned uncertainty stays below this
_CONFIRM = 2  # sightings in consecutive frames that make a first (or a lost) cutline believed
_PITCH_FRAMES = 8  # column profiles averaged to measure the loop pitch


class PositionEstimator(Protocol):
    source: str

    def update(self, frame: np.ndarray, truth: dict | None) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def make_position(camera: CameraConfig) -> PositionEstimator | None:
    """The estimator a camera's ``position`` settings ask for (None for ``source = "none"``)."""
    cfg = camera.position
    if cfg.source == "none":
        return None
    if cfg.source == "simulator":
        return SimulatorPosition()
    if cfg.source == "plc":
        return PlcPosition(cfg)
    return ImagePosition(cfg)


def _pos(rev: int, offset: float, circumference: float | None, source: str, ok: bool,
         cutline: float | None = None) -> dict[str, Any]:
    return {"rev": int(rev), "offset_px": round(float(offset), 2),
            "circumference_px": None if circumference is None else round(float(circumference), 2),
            "source": source, "ok": bool(ok), "cutline_px": None if cutline is None else round(float(cutline), 2)}


def _wrap(u: float, c: float | None) -> tuple[int, float]:
    """(revolution, offset) of the unwrapped tube coordinate ``u``; revolutions count up whichever
    way the fabric moves."""
    if c is None:
        return 0, u
    rev = math.floor(u / c)
    off = u - rev * c
    if off >= c:  # float rounding
        off -= c
    return (rev if rev >= 0 else -rev - 1), off


def _gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 3 and frame.shape[2] == 1:
        return frame[:, :, 0]
    if frame.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(frame, code)
    return frame


class _Timing:
    """Counts and per-frame cost shared by the estimators."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.frames = 0
        self.ok = 0
        self.lost = 0
        self.ms: collections.deque[float] = collections.deque(maxlen=500)
        self.last: dict[str, Any] | None = None

    def _record(self, pos: dict[str, Any], t0: float) -> dict[str, Any]:
        self.ms.append((time.perf_counter() - t0) * 1000.0)
        self.frames += 1
        if pos["ok"]:
            self.ok += 1
        else:
            self.lost += 1
        self.last = pos
        return pos

    def stats(self) -> dict[str, Any]:
        last = self.last or {}
        ms = np.asarray(self.ms) if self.ms else np.zeros(1)
        return {"source": self.source, "frames": self.frames, "ok": self.ok, "lost": self.lost,
                "rev": last.get("rev"), "offset_px": last.get("offset_px"),
                "circumference_px": last.get("circumference_px"),
                "ms_p50": round(float(np.percentile(ms, 50)), 3), "ms_p99": round(float(np.percentile(ms, 99)), 3)}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# simulator truth
# --------------------------------------------------------------------------------------------------


class SimulatorPosition(_Timing):
    """The simulator's truth (``offset_px``, ``circumference_px``, ``revolution`` of the frame)."""

    def __init__(self) -> None:
        super().__init__("simulator")

    def update(self, frame: np.ndarray, truth: dict | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if not truth or "offset_px" not in truth:  # not a simulator frame: nothing known
            pos = _pos(0, 0.0, None, self.source, False)
        else:
            pos = _pos(int(truth["revolution"]), float(truth["offset_px"]), float(truth["circumference_px"]),
                       self.source, True, truth.get("cutline_px"))
        return self._record(pos, t0)


# --------------------------------------------------------------------------------------------------
# image displacement (phase correlation)
# --------------------------------------------------------------------------------------------------


class PhaseTracker:
    """Horizontal (and vertical) displacement between frames by phase correlation.

    A frame is turned into its spectrum once (:meth:`prepare`): grayscale, shrunk to ``work_rows``
    rows (and horizontally by an integer factor when wider than ``work_width``; the loops' fine
    horizontal detail is what makes the result precise, so frames are not shrunk more), a 9x9 box
    high-pass (removes the lighting's slow gradients), a Hann window, an OpenCV DFT. :meth:`shift`
    of two spectra returns the displacement in frame pixels and the correlation peak: the largest 3x3
    sum of the normalised cross-power spectrum's inverse (about 1 for the same fabric shifted, near 0
    for unrelated images), with at most a quarter of the work height of vertical motion."""

    def __init__(self, shape: tuple[int, int], work_width: int, work_rows: int) -> None:
        h, w = shape
        self.fx = max(1, math.ceil(w / work_width))
        self.ww = max(16, w // self.fx)
        self.wh = max(8, min(h, work_rows))
        self.fy = h / self.wh
        self.window = cv2.createHanningWindow((self.ww, self.wh), cv2.CV_32F)

    def prepare(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(spectrum, column profile at work resolution) of a grayscale frame."""
        small = cv2.resize(gray, (self.ww, self.wh), interpolation=cv2.INTER_AREA).astype(np.float32)
        profile = small.mean(axis=0)
        hp = small - cv2.blur(small, (9, 9), borderType=cv2.BORDER_REFLECT)
        hp *= self.window
        return cv2.dft(hp, flags=cv2.DFT_COMPLEX_OUTPUT), profile

    def shift(self, fa: np.ndarray, fb: np.ndarray) -> tuple[float, float, float]:
        """(dx, dy, peak): frame ``b`` shows the fabric of frame ``a`` moved by (-dx, -dy) pixels,
        i.e. ``dx`` is how far the tube coordinate of a frame column advanced (|dx| < width / 2)."""
        cross = cv2.mulSpectrums(fa, fb, 0, conjB=True)
        mag = cv2.magnitude(cross[..., 0], cross[..., 1]) + np.float32(1e-12)
        cross = cross / mag[..., None]
        r = cv2.idft(cross, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
        h, w = r.shape
        # the peak with the most weight in its 3x3 neighbourhood (a one-pixel spike - noise that two
        # frames share, shifted - is not the fabric's motion), within a quarter of the height vertically
        r3 = cv2.boxFilter(r, -1, (3, 3), normalize=False, borderType=cv2.BORDER_WRAP)
        r3[h // 4 + 1:h - h // 4] = -np.inf
        iy, ix = np.unravel_index(int(np.argmax(r3)), r3.shape)
        xs = [(ix - 1) % w, ix, (ix + 1) % w]
        ys = [(iy - 1) % h, iy, (iy + 1) % h]
        block = r[np.ix_(ys, xs)]
        peak = float(r3[iy, ix])
        sx = _parabola(*(float(v) for v in block[1]))
        sy = _parabola(*(float(v) for v in block[:, 1]))
        x = ix if ix <= w // 2 else ix - w
        y = iy if iy <= h // 2 else iy - h
        return (x + sx) * self.fx, (y + sy) * self.fy, peak


def _parabola(a: float, b: float, c: float) -> float:
    """Vertex offset (-0.5 .. 0.5) of the parabola through three equally spaced samples."""
    den = a - 2.0 * b + c
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))


# --------------------------------------------------------------------------------------------------
# the cutline in a column profile
# --------------------------------------------------------------------------------------------------


def profile_period(profiles: list[np.ndarray], pmin: float = 2.5, pmax: float = 64.0) -> float | None:
    """The dominant period (pixels) of column profiles - the wale (loop) pitch of a knitted fabric -
    from their averaged, detrended, Hann-windowed power spectra; None when no clear line stands out."""
    if not profiles:
        return None
    n = profiles[0].size
    pmax = min(pmax, n / 4.0)
    if n < 32 or pmax <= pmin:
        return None
    nfft = 1 << int(math.ceil(math.log2(4 * n)))
    win = np.hanning(n)
    power = np.zeros(nfft // 2 + 1)
    k = int(2 * pmax) | 1
    for p in profiles:
        x = p.astype(np.float64)
        x = x - cv2.blur(x[None, :], (k, 1), borderType=cv2.BORDER_REFLECT)[0]
        power += np.abs(np.fft.rfft(x * win, nfft)) ** 2
    freqs = np.fft.rfftfreq(nfft)
    band = np.nonzero((freqs >= 1.0 / pmax) & (freqs <= 1.0 / pmin))[0]
    if band.size < 3:
        return None
    i = int(band[np.argmax(power[band])])
    if power[i] < 8.0 * float(np.median(power[band])):
        return None
    off = _parabola(*np.log(np.maximum(power[i - 1:i + 2], 1e-30)))
    return float(1.0 / ((i + off) * (freqs[1] - freqs[0])))


def find_cutline(profile: np.ndarray, pitch: float, spacing: int, min_score: float) -> tuple[float, float] | None:
    """The cutline in a column profile: (centre column, score) or None.

    The profile is smoothed over one pitch (the loops' own period disappears) and compared with its
    surroundings (8 pitches); a needle left out shows as a narrow dark stripe, standing out by a
    robust z-score (median absolute deviation). With ``spacing`` > 0 two such stripes ``spacing``
    pitches apart are required (both must stand out by ``min_score``: a single dark needle line does
    not qualify); with 0, one. Stripes closer than 4 pitches to an edge are not considered."""
    n = profile.size
    k = max(1, int(round(pitch)))
    x = profile.astype(np.float32)[None, :]
    sm = cv2.blur(x, (k, 1), borderType=cv2.BORDER_REFLECT)[0]
    base = cv2.blur(x, (8 * k + 1, 1), borderType=cv2.BORDER_REFLECT)[0]
    d = sm - base
    mad = float(np.median(np.abs(d - np.median(d)))) * 1.4826 + 1e-6
    dark = -d / mad
    sep = spacing * pitch
    s0 = int(math.floor(sep))
    frac = sep - s0
    m = n - s0 - 1
    lo, hi = 4 * k, m - 4 * k
    if hi <= lo:
        return None
    if spacing > 0:
        second = dark[s0:s0 + m] * (1.0 - frac) + dark[s0 + 1:s0 + 1 + m] * frac
        score = np.minimum(dark[:m], second)
    else:
        score = dark[:m]
    i = lo + int(np.argmax(score[lo:hi]))
    best = float(score[i])
    if best < min_score:
        return None
    sub = _parabola(float(score[i - 1]), best, float(score[i + 1])) if 0 < i < m - 1 else 0.0
    return i + sub + sep / 2.0 + 0.5, best


# --------------------------------------------------------------------------------------------------
# the image estimator
# --------------------------------------------------------------------------------------------------


class _Displacement:
    """The accumulated displacement ``u`` (frame pixels; 0 at the first frame) with dead reckoning."""

    def __init__(self, cfg: PositionConfig) -> None:
        self.cfg = cfg
        self.tracker: PhaseTracker | None = None
        self.shape: tuple[int, int] | None = None
        self.u = 0.0
        self.v = 0.0  # speed, pixels per frame (for the prediction)
        self.ref: tuple[np.ndarray, float] | None = None  # last good spectrum and its u
        self.frames = 0
        self.measured = 0
        self.weak = 0
        self.resets = 0
        self.peaks: collections.deque[float] = collections.deque(maxlen=200)
        self.width = 0

    def update(self, gray: np.ndarray) -> tuple[bool, np.ndarray]:
        """Advance ``u`` by this frame; (measured, column profile at work resolution)."""
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        if shape != self.shape:
            if self.shape is not None:
                self.resets += 1
            self.shape, self.width = shape, shape[1]
            self.tracker = PhaseTracker(shape, self.cfg.work_width, self.cfg.work_rows)
            self.ref = None
        assert self.tracker is not None
        spec, profile = self.tracker.prepare(gray)
        self.frames += 1
        if self.ref is None:
            measured = self.frames == 1  # the very first frame is the origin; later: carried on
            if not measured:
                self.u += self.v
            self.ref = (spec, self.u)
            return measured, profile
        ref_spec, ref_u = self.ref
        dx, _dy, peak = self.tracker.shift(ref_spec, spec)
        self.peaks.append(peak)
        predicted = self.u + self.v
        w = float(self.tracker.ww * self.tracker.fx)
        dx += round((predicted - ref_u - dx) / w) * w  # the representative nearest the prediction
        if peak >= self.cfg.min_peak:
            new_u = ref_u + dx
            step = new_u - self.u
            self.v = step if self.measured == 0 else 0.5 * self.v + 0.5 * step
            self.u = new_u
            self.ref = (spec, new_u)
            self.measured += 1
            return True, profile
        self.weak += 1
        self.u = predicted
        if abs(self.u - ref_u) > 0.35 * w:  # no overlap left with the reference: start afresh
            self.ref = (spec, self.u)
        return False, profile

    def shift_origin(self, delta: float) -> None:
        """Move ``u`` (and the reference's) by ``delta`` (a drift correction)."""
        self.u += delta
        if self.ref is not None:
            self.ref = (self.ref[0], self.ref[1] + delta)


class ImagePosition(_Timing):
    """The fabric position estimated from the frames (see the module's description)."""

    def __init__(self, cfg: PositionConfig) -> None:
        super().__init__("image")
        self.cfg = cfg
        self.disp = _Displacement(cfg)
        self.circ: float | None = cfg.circumference_px
        self.c_samples = 0
        self.pitch: float | None = cfg.pitch_px  # frame pixels
        self._pitch_profiles: list[np.ndarray] = []
        # the cutline: its tube coordinate, and where (in u) and in which revolution it was last seen
        self.cut_t: float | None = None
        self.anchor_u: float | None = None
        self.anchor_rev = 0
        self.anchor_n = 0  # sightings averaged into anchor_u (this pass)
        self.pending: list[float] = []  # unconfirmed sightings (u), consecutive frames
        self.passes = 0
        self.rejected = 0
        self.resyncs = 0
        self.uncertain = 0.0  # px the offset may be off by after carrying on without measurement

    # -- tube coordinate ---------------------------------------------------------------------------
    def _tube(self, u: float) -> float:
        if self.anchor_u is None or self.circ is None or self.cut_t is None:
            return u
        return self.anchor_rev * self.circ + self.cut_t + (u - self.anchor_u)

    def update(self, frame: np.ndarray, truth: dict | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        gray = _gray(frame)
        width_before = self.disp.width
        measured, profile = self.disp.update(gray)
        if self.disp.width != width_before and width_before:  # another frame size: start again
            self._forget()
        if not measured and self.disp.frames > 1:
            self.uncertain += 0.1 * abs(self.disp.v) + 0.5
        fx = self.disp.tracker.fx if self.disp.tracker else 1
        if self.pitch is None:
            self._pitch_profiles.append(profile)
            if len(self._pitch_profiles) >= _PITCH_FRAMES:
                p = profile_period(self._pitch_profiles)
                self._pitch_profiles = []
                if p is not None:
                    self.pitch = p * fx
        if self.pitch is not None:
            found = find_cutline(profile, self.pitch / fx, self.cfg.cutline_needle_spacing, self.cfg.cutline_min_score)
            if found is None:
                self.pending = []
            else:
                self._sighting(self.disp.u + found[0] * fx)
        rev, off = _wrap(self._tube(self.disp.u), self.circ)
        ok = measured and self.uncertain <= UNCERTAIN_OK_PX
        return self._record(_pos(rev, off, self.circ, self.source, ok, self.cut_t), t0)

    def _forget(self) -> None:
        self.anchor_u = self.cut_t = None
        self.circ = self.cfg.circumference_px
        self.c_samples = self.anchor_rev = self.anchor_n = 0
        self.pending = []
        self.pitch = self.cfg.pitch_px
        self._pitch_profiles = []

    def _confirmed(self, u_s: float) -> bool:
        """Keep an unconfirmed sighting; True once _CONFIRM consecutive ones agree."""
        tol = 2.0 * (self.pitch or 6.0)
        if self.pending and abs(u_s - float(np.mean(self.pending))) > tol:
            self.pending = []
        self.pending.append(u_s)
        return len(self.pending) >= _CONFIRM

    def _sighting(self, u_s: float) -> None:
        """The cutline seen at ``u_s`` (in u): learn, count and re-anchor."""
        pitch = self.pitch or 6.0
        width = float(self.disp.width)
        same_tol = 2.0 * pitch + self.uncertain
        if self.anchor_u is None:  # the first pass: its place becomes the cutline's
            if self._confirmed(u_s):
                self.anchor_u = float(np.mean(self.pending))
                self.anchor_n = len(self.pending)
                self.pending = []
                self.passes = 1
                if self.circ is not None:
                    self._fix_cutline()
            return
        gap = u_s - self.anchor_u
        if abs(gap) <= same_tol:  # the same pass, again: average
            self._refine_anchor(u_s)
            return
        if self.circ is None or self.cut_t is None:  # the second pass gives the circumference
            if abs(gap) > width and self._confirmed(u_s):
                u2 = float(np.mean(self.pending))
                self.circ = abs(u2 - self.anchor_u)
                self.c_samples = 1
                self._fix_cutline()
                self._new_pass(u2, 1 if u2 > self.anchor_u else -1, len(self.pending))
            return
        n = round(gap / self.circ)
        err = gap - n * self.circ
        tol = max(3.0 * pitch, 0.01 * self.circ) + self.uncertain + 0.01 * self.circ * max(0, abs(n) - 1)
        if n != 0 and abs(err) <= tol:
            if abs(n) == 1:  # a whole revolution measured: refine the circumference
                self.c_samples += 1
                self.circ += (abs(gap) - self.circ) / min(self.c_samples, 16)
            self._new_pass(u_s, n, 1)
            return
        # not where the cutline is expected: a defect, or the estimate is lost (after a long outage)
        self.rejected += 1
        lost = abs(self.disp.u - self.anchor_u) > 2.5 * self.circ or self.uncertain > UNCERTAIN_OK_PX
        if lost and n != 0 and self._confirmed(u_s):
            self.resyncs += 1
            self._new_pass(float(np.mean(self.pending)), n, len(self.pending))

    def _fix_cutline(self) -> None:
        assert self.anchor_u is not None and self.circ is not None
        rev = math.floor(self.anchor_u / self.circ)
        self.anchor_rev = rev
        self.cut_t = self.anchor_u - rev * self.circ

    def _new_pass(self, u_s: float, n: int, sightings: int) -> None:
        """The cutline is back after ``n`` revolutions: its tube coordinate is known, so the frame's is
        too (the drift accumulated since the last pass disappears)."""
        self.anchor_rev += n
        self.anchor_u = u_s
        self.anchor_n = sightings
        self.pending = []
        self.passes += 1
        self.uncertain = 0.0

    def _refine_anchor(self, u_s: float) -> None:
        assert self.anchor_u is not None
        self.anchor_n += 1
        self.anchor_u += (u_s - self.anchor_u) / self.anchor_n
        self.pending = []
        self.uncertain = 0.0

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        peaks = list(self.disp.peaks)
        s.update(cutline_passes=self.passes, cutline_rejected=self.rejected, resyncs=self.resyncs,
                 pitch_px=None if self.pitch is None else round(self.pitch, 3),
                 speed_px=round(self.disp.v, 2), weak_frames=self.disp.weak,
                 peak_p50=round(float(np.median(peaks)), 3) if peaks else None)
        return s


# --------------------------------------------------------------------------------------------------
# the PLC's revolution counter
# --------------------------------------------------------------------------------------------------


class RegisterReader:
    """Reads the revolution counter (and angle) registers of a PLC over Modbus TCP: :meth:`read_once`
    on demand, or every ``poll_s`` in a daemon thread (:meth:`start`). :meth:`latest` is
    (counter, angle or None, monotonic time of the read) or None before the first good read."""

    def __init__(self, cfg: PositionPlcConfig) -> None:
        from pymodbus.client import ModbusTcpClient

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # failures are counted and logged here
        self.cfg = cfg
        self.client = ModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0)
        self._latest: tuple[int, int | None, float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0
        self.failures = 0
        self.error = ""

    def _registers(self, address: int, count: int) -> list[int]:
        rr = self.client.read_holding_registers(address, count=count, device_id=self.cfg.unit_id)
        if rr is None or rr.isError():
            raise OSError(f"PLC {self.cfg.host}:{self.cfg.port} refused to read register {address}: {rr}")
        return [int(v) for v in rr.registers]

    def read_once(self) -> bool:
        """One read of the registers; False (and ``error`` set) when the PLC did not answer."""
        from pymodbus.exceptions import ModbusException

        cfg = self.cfg
        try:
            if not self.client.connected and not self.client.connect():
                raise OSError(f"cannot connect to the PLC at {cfg.host}:{cfg.port}")
            words = self._registers(cfg.revolution_register, cfg.revolution_words)
            counter = words[0] if len(words) == 1 else (words[0] << 16) | words[1]
            angle = self._registers(cfg.angle_register, 1)[0] if cfg.angle_register is not None else None
        except (ModbusException, OSError, AttributeError, IndexError) as e:
            self.client.close()
            self.failures += 1
            if str(e) != self.error:
                log.warning("position: PLC read failed", error=str(e), failures=self.failures)
            self.error = str(e)
            return False
        with self._lock:
            self._latest = (counter, angle, time.monotonic())
        self.reads += 1
        self.error = ""
        return True

    def latest(self) -> tuple[int, int | None, float] | None:
        with self._lock:
            return self._latest

    def start(self) -> RegisterReader:
        def loop() -> None:
            while not self._stop.is_set():
                self.read_once()
                self._stop.wait(self.cfg.poll_s)

        self._thread = threading.Thread(target=loop, name="knitwatch-position-plc", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.cfg.timeout_s + 1.0)
        self.client.close()


class PlcPosition(_Timing):
    """The revolution from the PLC's counter; the offset from its angle register, or from the image
    displacement since the counter last counted; the circumference from the setting, or from the
    image displacement over a whole revolution. Not ``ok`` while the PLC's values are older than
    ``stale_s`` or the circumference is not known yet. ``threaded=False``: no background thread, the
    caller reads (:meth:`RegisterReader.read_once`)."""

    def __init__(self, cfg: PositionConfig, *, threaded: bool = True) -> None:
        super().__init__("plc")
        self.cfg = cfg
        self.reader = RegisterReader(cfg.plc)
        if threaded:
            self.reader.start()
        self.circ: float | None = cfg.circumference_px
        self.c_samples = 0
        need_images = cfg.plc.angle_register is None or cfg.circumference_px is None
        self.disp = _Displacement(cfg) if need_images else None
        self.bits = 16 * cfg.plc.revolution_words
        self.counter: int | None = None
        self.rev = 0
        self.u_at_count: float | None = None  # u when the counter last counted
        self.whole = False  # u_at_count was set at a counted step (a full revolution follows)
        self.counter_resets = 0

    def update(self, frame: np.ndarray, truth: dict | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        measured = True
        if self.disp is not None:
            measured, _ = self.disp.update(_gray(frame))
        u = self.disp.u if self.disp is not None else 0.0
        got = self.reader.latest()
        fresh = got is not None and time.monotonic() - got[2] <= self.cfg.plc.stale_s
        angle: int | None = None
        if got is not None:
            counter, angle, _t = got
            self._count(counter, u)
        if self.u_at_count is None:
            self.u_at_count = u
        if angle is not None:
            frac = (angle % self.cfg.plc.angle_full_scale) / self.cfg.plc.angle_full_scale
            off = frac * self.circ if self.circ is not None else 0.0
        else:
            off = u - self.u_at_count
            if self.circ is not None:
                off %= self.circ
        ok = fresh and self.circ is not None and measured
        return self._record(_pos(self.rev, off, self.circ, self.source, ok), t0)

    def _count(self, counter: int, u: float) -> None:
        if self.counter is None:
            self.counter, self.rev = counter, counter
            return
        delta = (counter - self.counter) % (1 << self.bits)
        if delta == 0:
            return
        if delta >= 1 << (self.bits - 1):  # counted backwards: the counter was reset (a new roll ...)
            self.counter_resets += 1
            log.info("position: the PLC's revolution counter went back", was=self.counter, now=counter)
            self.counter = counter
            return
        self.counter = counter
        self.rev += delta
        if self.disp is not None and self.cfg.circumference_px is None and delta == 1 and self.whole \
                and self.u_at_count is not None:
            self.c_samples += 1
            length = abs(u - self.u_at_count)
            self.circ = length if self.circ is None else self.circ + (length - self.circ) / min(self.c_samples, 16)
        self.u_at_count = u
        self.whole = True

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(plc_reads=self.reader.reads, plc_failures=self.reader.failures, plc_error=self.reader.error,
                 counter=self.counter, counter_resets=self.counter_resets)
        return s

    def close(self) -> None:
        self.reader.close()
