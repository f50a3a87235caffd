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
  measurement: the offset is carried on at the mean speed of the last 16 measured frames, the frame
  is ``ok: false``, and the last good frame stays the reference while it can still overlap the view,
  so the next good frame is measured against it. The cutline is
  found in the column profile as two narrow dark stripes ``cutline_needle_spacing`` loop pitches
  apart (the pitch is measured from the profile's spectrum unless configured); its first pass fixes
  its tube coordinate, its second the circumference, and every pass after that counts the
  revolution, re-anchors the offset (the accumulated drift is removed) and refines the circumference.
  The origin (tube coordinate 0) is the first frame's column 0.
* :class:`PlcPosition` - the machine's revolution counter (and optionally the tube angle) from PLC
  holding registers over Modbus TCP, read by a background thread; the offset comes from the angle
  register or else from the image displacement since the counter last counted, and the
  circumference from the setting or else from the image displacement over a whole revolution.
* :class:`TriggerPosition` - the camera's frame counter (truth key ``frame_counter`` from the pylon
  and genicam sources) when a hardware trigger fires once every 360/N degrees of the cylinder.
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
    "TriggerPosition",
    "find_cutline",
    "make_position",
    "profile_period",
]

UNCERTAIN_OK_PX = 16.0  # frames are "ok" only while the dead-reckoned uncertainty stays below this
_CONFIRM = 3  # sightings of one pass that make it believed
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
    if cfg.source == "trigger":
        return TriggerPosition(cfg)
    return ImagePosition(cfg)


def _pos(rev: int, offset: float, circumference: float | None, source: str, ok: bool,
         cutline: float | None = None) -> dict[str, Any]:
    off = round(float(offset), 2)
    circ = None if circumference is None else round(float(circumference), 2)
    if circ is not None and off >= circ:  # rounded up to the circumference: the next revolution's 0
        off, rev = 0.0, rev + 1
    return {"rev": int(rev), "offset_px": off, "circumference_px": circ, "source": source, "ok": bool(ok),
            "cutline_px": None if cutline is None else round(float(cutline), 2)}


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
        fx = max(1, math.ceil(w / work_width))
        self.ww = max(16, w // fx)
        self.fx = w / self.ww  # frame pixels per work pixel
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
        peak = float(r3[iy, ix])
        block = r[np.ix_([(iy - 1) % h, iy, (iy + 1) % h], [(ix - 1) % w, ix, (ix + 1) % w])]
        by, bx = np.unravel_index(int(np.argmax(block)), block.shape)  # the highest sample of that neighbourhood
        iy, ix = (iy + by - 1) % h, (ix + bx - 1) % w
        block = r[np.ix_([(iy - 1) % h, iy, (iy + 1) % h], [(ix - 1) % w, ix, (ix + 1) % w])]
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


def find_cutline(profile: np.ndarray, pitch: float, spacing: int, min_depth: float) -> tuple[float, float] | None:
    """The cutline in a column profile: (centre column, depth) or None.

    A needle left out leaves a gap between two wales, darker than the grooves between the other
    wales. Per column, the darkest value within one pitch is compared with the bright level around it
    (the brightest within a pitch, averaged over 8 pitches): its *relative depth* is how much darker
    than the frame's median that ratio is (the lighting's level and gradients cancel out). With
    ``spacing`` > 0 two such gaps ``spacing`` pitches apart must both be at least ``min_depth`` deep
    (a single dark needle line does not qualify); with 0, one. The centre is refined to a sub-pixel
    position from the raw profile's minima. Gaps closer than 2 pitches to an edge are not considered."""
    n = profile.size
    k = max(1, int(round(pitch)))
    x = profile.astype(np.float32)[None, :]
    kernel = np.ones((1, k), np.uint8)
    low = cv2.erode(x, kernel, borderType=cv2.BORDER_REFLECT)[0]
    high = cv2.dilate(x, kernel, borderType=cv2.BORDER_REFLECT)[0]
    level = cv2.blur(high[None, :], (8 * k + 1, 1), borderType=cv2.BORDER_REFLECT)[0]
    ratio = low / np.maximum(level, np.float32(1.0))
    depth = float(np.median(ratio)) - ratio
    sep = spacing * pitch
    s0 = int(math.floor(sep))
    frac = sep - s0
    m = n - s0 - 1
    lo, hi = 2 * k, m - 2 * k
    if hi <= lo:
        return None
    if spacing > 0:
        second = depth[s0:s0 + m] * (1.0 - frac) + depth[s0 + 1:s0 + 1 + m] * frac
        score = np.minimum(depth[:m], second)
    else:
        score = depth[:m]
    i = lo + int(np.argmax(score[lo:hi]))
    best = float(score[i])
    if best < min_depth:
        return None
    # the gaps' exact places: the raw profile's minima near them (a stripe is up to a pitch wide)
    centres = [_minimum(profile, i, k)]
    if spacing > 0:
        centres.append(_minimum(profile, i + sep, k))
    return float(np.mean(centres)), best


def _minimum(profile: np.ndarray, x: float, k: int) -> float:
    """Sub-pixel column of the profile's minimum within about a pitch of ``x`` (column centres at +0.5)."""
    n = profile.size
    a, b = max(1, int(math.floor(x - k))), min(n - 1, int(math.ceil(x + k)) + 1)
    if b - a < 1:
        return x + 0.5
    j = a + int(np.argmin(profile[a:b]))
    j = min(max(j, 1), n - 2)
    return j + _parabola(-float(profile[j - 1]), -float(profile[j]), -float(profile[j + 1])) + 0.5


# --------------------------------------------------------------------------------------------------
# the image estimator
# --------------------------------------------------------------------------------------------------


class _Displacement:
    """The accumulated displacement ``u`` (frame pixels; 0 at the first frame) with dead reckoning.

    Each frame is measured against the last good one (normally the previous frame); a frame whose
    correlation peak is weak is carried on at the mean speed of the last 16 measured frames, and the
    last good frame stays the reference while enough of it can still be in view."""

    def __init__(self, cfg: PositionConfig) -> None:
        self.cfg = cfg
        self.tracker: PhaseTracker | None = None
        self.shape: tuple[int, int] | None = None
        self.u = 0.0
        self.steps: collections.deque[float] = collections.deque(maxlen=16)  # measured px per frame
        self.ref: tuple[np.ndarray, float, int] | None = None  # reference spectrum, its u and frame number
        self.ref_good = False  # the reference was measured (else: carried on, e.g. after a long outage)
        self.frames = 0
        self.measured = 0
        self.weak = 0
        self.resets = 0
        self.peaks: collections.deque[float] = collections.deque(maxlen=200)
        self.width = 0

    @property
    def v(self) -> float:
        """The speed (px per frame) used to carry the position on."""
        return float(np.mean(self.steps)) if self.steps else 0.0

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
                self.weak += 1
            self.ref, self.ref_good = (spec, self.u, self.frames), measured
            return measured, profile
        ref_spec, ref_u, ref_frame = self.ref
        dx, _dy, peak = self.tracker.shift(ref_spec, spec)
        self.peaks.append(peak)
        predicted = self.u + self.v
        w = float(self.width)
        dx += round((predicted - ref_u - dx) / w) * w  # the representative nearest the prediction
        if peak >= self.cfg.min_peak:
            self.u = ref_u + dx
            self.steps.append(dx / (self.frames - ref_frame))
            self.ref, self.ref_good = (spec, self.u, self.frames), True
            self.measured += 1
            return True, profile
        self.weak += 1
        self.u = predicted
        if not self.ref_good or abs(self.u - ref_u) > 0.35 * w:  # no good reference in view: this one
            self.ref, self.ref_good = (spec, self.u, self.frames), False
        return False, profile


class _Pass:
    """The cutline's sightings while it crosses the view once (they lie within a few pitches in ``u``)."""

    def __init__(self, ref: float, clean: bool) -> None:
        self.ref = ref  # u of the first sighting
        self.clean = clean  # no frame was carried on (unmeasured) since the previous pass
        self.sightings: list[tuple[float, float]] = []  # (u, depth)
        self.accepted = False
        self.rejected = False
        self.n = 0  # revolutions since the previous pass, once accepted

    def best(self, tol: float) -> tuple[float, int]:
        """(mean u, size) of the largest group of sightings within ``tol`` of each other's centre
        (ties: the deeper); a stray pair (a defect next to one of the gaps) is outvoted."""
        us = np.array([u for u, _ in self.sightings])
        ds = np.array([d for _, d in self.sightings])
        near = np.abs(us[:, None] - us[None, :]) <= tol
        counts = near.sum(axis=1)
        depth = (near * ds[None, :]).sum(axis=1)
        i = max(range(len(us)), key=lambda j: (int(counts[j]), float(depth[j])))
        return float(us[near[i]].mean()), int(counts[i])


class ImagePosition(_Timing):
    """The fabric position estimated from the frames (see the module's description)."""

    def __init__(self, cfg: PositionConfig) -> None:
        super().__init__("image")
        self.cfg = cfg
        self.disp = _Displacement(cfg)
        self.pitch: float | None = cfg.pitch_px  # frame pixels
        self._pitch_profiles: list[np.ndarray] = []
        self._other_pitch: float | None = None  # a pitch measured clearly off the fabric's: another article?
        self.rev_base = 0  # revolutions counted before the fabric changed (the count goes on across a change)
        self.u_origin = 0.0  # the displacement where the current fabric began
        self.last_rev = 0
        self.fabric_changes = 0
        self._forget()
        self.passes = 0
        self.rejected = 0
        self.resyncs = 0

    def _forget(self) -> None:
        self.circ: float | None = self.cfg.circumference_px
        self.c_samples = 0
        self.cut_t: float | None = None  # the cutline's tube coordinate
        self.anchor_u: float | None = None  # where (in u) the cutline was seen last, in revolution anchor_rev
        self.anchor_rev = 0
        self.base_u: float | None = None  # the same, of the pass before the current one
        self.base_rev = 0
        self.cur: _Pass | None = None
        self.dead = False  # a frame was carried on since the last pass
        self.uncertain = 0.0  # px the offset may be off by after frames carried on without measurement

    def _tube(self, u: float) -> float:
        """The unwrapped tube coordinate of ``u`` (``u`` itself until the circumference is known)."""
        if self.anchor_u is None or self.circ is None or self.cut_t is None:
            return u
        return self.anchor_rev * self.circ + self.cut_t + (u - self.anchor_u)

    def update(self, frame: np.ndarray, truth: dict | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        gray = _gray(frame)
        resets = self.disp.resets
        measured, profile = self.disp.update(gray)
        if self.disp.resets != resets:  # another frame size: the tube is learned afresh
            self._forget()
            self.pitch, self._pitch_profiles = self.cfg.pitch_px, []
        if not measured and self.disp.frames > 1:
            self.dead = True
            self.uncertain += 0.05 * abs(self.disp.v) + 0.5
        fx = self.disp.tracker.fx if self.disp.tracker else 1.0
        if self.cfg.pitch_px is None:  # measured, and measured again all the time: the machine may change article
            self._pitch_profiles.append(profile)
            if len(self._pitch_profiles) >= _PITCH_FRAMES:
                p = profile_period(self._pitch_profiles)
                self._pitch_profiles = []
                if p is not None:
                    self._measured_pitch(p * fx)
        seen: float | None = None  # where this frame shows the cutline (unwrapped), if it does
        if self.pitch is not None:
            found = find_cutline(profile, self.pitch / fx, self.cfg.cutline_needle_spacing, self.cfg.cutline_min_depth)
            if found is not None:
                seen = self.disp.u - self.u_origin + found[0] * fx
                self._sighting(seen, found[1])
        rev, off = _wrap(self._tube(self.disp.u - self.u_origin), self.circ)
        rev += self.rev_base
        self.last_rev = rev
        ok = measured and self.uncertain <= UNCERTAIN_OK_PX
        # the cutline's tube coordinate; until the circumference is known, in the offset's unwrapped
        # coordinate: where this frame shows it, else where its first pass was (so the decision layer
        # knows the cutline from its first pass on, `knitwatch.pipeline.decision.cutline`)
        cut = self.cut_t if self.cut_t is not None else (seen if seen is not None else self.anchor_u)
        return self._record(_pos(rev, off, self.circ, self.source, ok, cut), t0)

    def _measured_pitch(self, p: float) -> None:
        """A new measurement of the loop pitch. Twice in a row more than 15 % off the fabric's (and within 5 %
        of each other): another fabric - the machine changed article. Its cutline and circumference are
        learned afresh (``fabric_changes``); the revolutions count on from the next one."""
        if self.pitch is None:
            self.pitch = p
            return
        if abs(p - self.pitch) <= 0.15 * self.pitch:
            self._other_pitch = None
            return
        if self._other_pitch is None or abs(p - self._other_pitch) > 0.05 * self._other_pitch:
            self._other_pitch = p
            return
        self.fabric_changes += 1
        self.rev_base = self.last_rev + 1
        self.u_origin = self.disp.u
        self._forget()
        self.pitch, self._other_pitch = p, None

    # -- the cutline -------------------------------------------------------------------------------
    def _sighting(self, u_s: float, depth: float) -> None:
        """The cutline seen at ``u_s`` (in u): learn, count and re-anchor."""
        pitch = self.pitch or 6.0
        p = self.cur
        if p is None or abs(u_s - p.ref) > (self.cfg.cutline_needle_spacing + 4) * pitch:  # a new pass begins
            self._close(p)
            p = self.cur = _Pass(u_s, clean=not self.dead)
            self.base_u, self.base_rev = self.anchor_u, self.anchor_rev
        p.sightings.append((u_s, depth))
        u_c, count = p.best(max(2.0, 0.5 * pitch))
        if count < _CONFIRM:
            return
        if self.base_u is None:  # the first pass: its place becomes the cutline's
            self.anchor_u = u_c
            self._accept(p, 0)
            if self.circ is not None:
                self._fix_cutline()
            return
        gap = u_c - self.base_u
        if self.circ is None or self.cut_t is None:  # the second pass gives the circumference
            if abs(gap) <= self.disp.width:  # not a revolution later: a defect
                self._reject(p)
                return
            self.circ, self.c_samples = abs(gap), 1
            self._fix_cutline()
            self._accept(p, 1 if gap > 0 else -1, u_c)
            return
        n = round(gap / self.circ)
        err = gap - n * self.circ
        measured = self.c_samples > 0  # else a configured circumference, taken as a guess within 10 %
        tol = max(3.0 * pitch, (0.01 if measured else 0.1) * self.circ) + self.uncertain \
            + 0.01 * self.circ * max(0, abs(n) - 1)
        if n != 0 and abs(err) <= tol:
            if not measured and abs(n) == 1 and p.clean:
                self.circ, self.c_samples = abs(gap), 1
            self._accept(p, n, u_c)
            return
        # not where the cutline is due: a defect, or the estimate is lost (after a long outage)
        lost = self.uncertain > UNCERTAIN_OK_PX or abs(self.disp.u - self.u_origin - self.base_u) > 2.5 * self.circ
        if lost and n != 0 and count > _CONFIRM:
            if not p.accepted:
                self.resyncs += 1
            p.clean = False
            self._accept(p, n, u_c)
            return
        self._reject(p)

    def _fix_cutline(self) -> None:
        """The circumference is known: the cutline's tube coordinate follows from its first pass."""
        first = self.base_u if self.base_u is not None else self.anchor_u
        assert first is not None and self.circ is not None
        rev = math.floor(first / self.circ)
        self.cut_t = first - rev * self.circ
        if self.base_u is not None:
            self.base_rev = rev
        else:
            self.anchor_rev = rev

    def _accept(self, p: _Pass, n: int, u_c: float | None = None) -> None:
        """The cutline of pass ``p`` is ``n`` revolutions after the previous one, at ``u_c``: the
        frame's tube coordinate is known again (the drift accumulated since the last pass is gone)."""
        if u_c is not None:
            self.anchor_u, self.anchor_rev = u_c, self.base_rev + n
        if not p.accepted:
            p.accepted = True
            self.passes += 1
        p.n = n
        self.dead = False
        self.uncertain = 0.0

    def _reject(self, p: _Pass) -> None:
        if not p.rejected:
            p.rejected = True
            self.rejected += 1

    def _close(self, p: _Pass | None) -> None:
        """A pass is over: a whole revolution measured without a gap refines the circumference."""
        if p is None or not p.accepted or not p.clean or abs(p.n) != 1 or self.base_u is None \
                or self.anchor_u is None or self.circ is None or self.cut_t is None:
            return
        self.c_samples += 1
        self.circ += (abs(self.anchor_u - self.base_u) - self.circ) / min(self.c_samples, 16)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        peaks = list(self.disp.peaks)
        s.update(cutline_passes=self.passes, cutline_rejected=self.rejected, resyncs=self.resyncs,
                 fabric_changes=self.fabric_changes,
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
            raise OSError(f"refused to read holding register {address}: {rr}")
        return [int(v) for v in rr.registers]

    def read_once(self) -> bool:
        """One read of the registers; False (and ``error`` set) when the PLC did not answer."""
        from pymodbus.exceptions import ModbusException

        cfg = self.cfg
        try:
            if not self.client.connected and not self.client.connect():
                raise OSError("cannot connect")
            words = self._registers(cfg.revolution_register, cfg.revolution_words)
            counter = words[0] if len(words) == 1 else (words[0] << 16) | words[1]
            angle = self._registers(cfg.angle_register, 1)[0] if cfg.angle_register is not None else None
        except (ModbusException, OSError, AttributeError, IndexError) as e:
            self.client.close()
            self.failures += 1
            error = f"PLC {cfg.host}:{cfg.port}: {e}"
            if error != self.error:  # logged when it changes, counted always
                log.warning("position: PLC read failed", error=error, failures=self.failures)
            self.error = error
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


# --------------------------------------------------------------------------------------------------
# hardware trigger: the camera's frame counter
# --------------------------------------------------------------------------------------------------


class TriggerPosition(_Timing):
    """The position from the camera's frame counter when a hardware trigger (the machine's encoder)
    fires once every 360/N degrees of the cylinder (N = ``frames_per_revolution``).

    Frame k (counted from the first frame the daemon got, k = 0) is revolution ``k // N`` at offset
    ``(k % N) x circumference / N``; the circumference is ``circumference_px`` or else N x the frame
    width. The counter comes with each frame as ``truth["frame_counter"]`` (the pylon source's block id,
    the genicam source's frame id). A gap in the counter is frames the camera took but the daemon lost:
    they still advance the position (counted in ``counter_gaps``). A counter that goes back (or repeats)
    is a new connection to the camera (a reconnect; a 16-bit GigE Vision block id that wrapped reads the
    same): counting restarts from the last known position plus one frame (``counter_resets``, logged);
    frames the camera took during the reconnect are not known and shift every later position. A frame
    without a counter is ``ok: false`` and placed one frame after the previous one (dead reckoning); the
    frames without a counter are ``no_counter``."""

    def __init__(self, cfg: PositionConfig) -> None:
        super().__init__("trigger")
        if cfg.frames_per_revolution is None:
            raise ValueError("position source 'trigger' needs frames_per_revolution")
        self.n = int(cfg.frames_per_revolution)
        self.circ: float | None = cfg.circumference_px
        self.k: int | None = None  # frame index of the last frame with a counter
        self.counter: int | None = None  # that frame's counter
        self.uncounted = 0  # frames since then without a counter
        self.counter_gaps = 0
        self.counter_resets = 0
        self.no_counter = 0

    def update(self, frame: np.ndarray, truth: dict | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.circ is None:
            self.circ = float(self.n * frame.shape[1])
        raw = truth.get("frame_counter") if isinstance(truth, dict) else None
        counter = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        if counter is None:
            self.no_counter += 1
            if self.no_counter == 1:
                log.warning("position: a frame without the camera's frame counter (source 'trigger' needs a "
                            "pylon or genicam camera); such frames are not ok")
            self.uncounted += 1
            k = (self.k if self.k is not None else -1) + self.uncounted
            return self._record(self._at(max(k, 0), False), t0)
        if self.k is None or self.counter is None:  # the first counter: after any frames without one
            self.k = self.uncounted
        elif counter > self.counter:
            delta = counter - self.counter
            self.counter_gaps += max(delta - 1 - self.uncounted, 0)  # frames without a counter did arrive
            self.k += delta
        else:
            self.counter_resets += 1
            log.info("position: the camera's frame counter went back (a reconnect); counting on from the last "
                     "position", was=self.counter, now=counter)
            self.k += self.uncounted + 1
        self.counter, self.uncounted = counter, 0
        return self._record(self._at(self.k, True), t0)

    def _at(self, k: int, ok: bool) -> dict[str, Any]:
        assert self.circ is not None
        rev, i = divmod(k, self.n)
        return _pos(rev, i * self.circ / self.n, self.circ, self.source, ok)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(frames_per_revolution=self.n, counter=self.counter, counter_gaps=self.counter_gaps,
                 counter_resets=self.counter_resets, no_counter=self.no_counter)
        return s
