"""Procedural knitted-fabric simulator (numpy + OpenCV only).

It draws what a camera on a circular knitting machine sees: columns of interlocking V-shaped loops
(wales) in rows (courses), with yarn thickness, shading, hairiness and loop-to-loop irregularity; the
cutline (two needles left out, normal fabric); seven kinds of defects with pixel-exact masks;
and :class:`KnitStream`, the fabric tube turning past a fixed camera.

Conventions
-----------
* Images are ``uint8``: ``(H, W)`` grayscale, or ``(H, W, 3)`` **BGR** (OpenCV order) for colour.
* Points are ``(x, y)``; boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive.
* Masks are ``uint8`` 0/255, ``(H, W)``.
* The horizontal period of the loop columns is exactly ``spec.pitch_px`` (an integer number of
  wales is fitted to a stream's tube, which changes the pitch by well under 1 %).
* Everything is deterministic given the seed: the fabric is a pure function of absolute tube
  coordinates (hashed per loop), so any window of the web renders the same loops.

How a picture is made: the loops are rendered at a supersampled resolution (each yarn leg an
elliptic tube, shaded by a light from the upper left, the V legs of one wale shaded differently
as twisted yarn does), downsampled, given course streaks (barre) and stray fibres, normalised to
``spec.brightness`` / ``spec.contrast``, blurred by the optics (``blur_sigma``), tinted (colour),
and finally sensor noise is added. Defects are painted on the noise-free picture so that the
sensor noise covers them like the rest.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFECT_KINDS",
    "TEXTURES",
    "FabricSpec",
    "FrameTruth",
    "KnitStream",
    "ScheduledDefect",
    "add_defect",
    "cutline_halfwidth",
    "defect_extent",
    "measure_stream_rate",
    "render_fabric",
    "render_labelled_sample",
    "render_sample",
]

DEFECT_KINDS: tuple[str, ...] = ("hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly")
TEXTURES: tuple[str, ...] = ("jersey", "pique")

_CUTLINE_SEP = 4  # wales between the two needles left out at the cutline
_MASK_THRESHOLD = 0.2  # alpha at or above which a defect pixel belongs to the mask
_ALPHA_FLOOR = 0.03  # alpha below which a pixel is left exactly unchanged


@dataclass(frozen=True)
class FabricSpec:
    """What the fabric and the camera look like."""

    texture: str = "jersey"  # "jersey" | "pique" (honeycomb look)
    pitch_px: float = 6.0  # wale spacing in pixels (horizontal period of the loop columns)
    course_ratio: float = 0.8  # course (row) spacing = pitch_px * course_ratio
    brightness: float = 128.0  # mean gray level of the fabric (36..203 in reality)
    contrast: float = 1.0
    noise_sigma: float = 3.0  # sensor noise (gray levels)
    blur_sigma: float = 0.6
    color: bool = False  # False -> uint8 (H, W); True -> uint8 (H, W, 3) (a dyed yarn tint)
    irregularity: float = 0.08  # loop-to-loop random variation

    def __post_init__(self) -> None:
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, not {self.texture!r}")
        if not 2.0 <= self.pitch_px <= 64.0:
            raise ValueError(f"pitch_px must be within 2..64, not {self.pitch_px}")
        if not 0.3 <= self.course_ratio <= 2.0:
            raise ValueError(f"course_ratio must be within 0.3..2, not {self.course_ratio}")
        if not 0.0 <= self.brightness <= 255.0:
            raise ValueError(f"brightness must be within 0..255, not {self.brightness}")
        if self.contrast < 0 or self.noise_sigma < 0 or self.blur_sigma < 0 or self.irregularity < 0:
            raise ValueError("contrast, noise_sigma, blur_sigma and irregularity must not be negative")

    @property
    def course_px(self) -> float:
        """Course (row) spacing in pixels."""
        return self.pitch_px * self.course_ratio


# --------------------------------------------------------------------------------------------------
# Deterministic hashing: random numbers as a pure function of integer coordinates.
# --------------------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _u32(a: np.ndarray | int) -> np.ndarray:
    return (np.asarray(a, dtype=np.int64) & _U32).astype(np.uint32)


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _seed32(seed: int, salt: int) -> np.uint32:
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    v = (s ^ (s >> 32) ^ (salt * 0x9E3779B9)) & _U32
    return np.uint32(int(_fmix(np.array([v], dtype=np.uint32))[0]))


def _hash01(seed: int, salt: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    """Uniform [0, 1) float32, a pure function of (seed, salt, a, b)."""
    with np.errstate(over="ignore"):
        h = _u32(a) * np.uint32(0x9E3779B1) + _seed32(seed, salt)
        h = _fmix(h ^ (_u32(b) * np.uint32(0x7FEB352D)))
        h = _fmix(h + np.uint32(0x165667B1))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------------------------------
# The fabric renderer
# --------------------------------------------------------------------------------------------------

_LIGHT = np.array([-0.50, -0.62, 0.60], dtype=np.float64)
_LIGHT /= np.linalg.norm(_LIGHT)
_BG = 0.11  # what shows through the gaps between loops (relative to the yarn)


def _leg_constants(p: float, c: float) -> dict[str, float]:
    # A leg runs from the top outer corner of its cell to the bottom centre (one side of the V).
    top_x, top_y, bot_x, bot_y = 0.43 * p, -0.14 * c, 0.05 * p, 1.10 * c
    vx, vy = bot_x - top_x, bot_y - top_y  # for the right leg (side=+1); mirrored for the left
    length = math.hypot(vx, vy)
    return {
        "mx": 0.5 * (top_x + bot_x),
        "my": 0.5 * (top_y + bot_y),
        "dx": vx / length,  # right-leg direction x; the left leg uses -dx
        "dy": vy / length,
        "hl": 0.5 * length,
    }


def _cutline_warp(u: np.ndarray, missing: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp wale coordinates so the wales next to a missing needle spread into its place.

    Returns the warped wale coordinate and a flag for the narrow gap that stays open (where the
    yarn floats across the missing needle)."""
    u = u.copy()
    gap = np.zeros(u.shape, dtype=bool)
    gw = 0.42  # visible width of the gap, in wales
    side = 1.0 + (1.0 - gw) / 2.0
    for m in missing:
        t = u - (m - 1)
        sel = (t >= 0) & (t < 3)
        ts = t[sel]
        out = np.where(ts < side, (m - 1) + ts / side, (m + 1) + (ts - side - gw) / side)
        g = (ts >= side) & (ts < side + gw)
        out = np.where(g, m + 0.5, out)
        u[sel] = out
        gap[sel] = g
    return u, gap


def _raw_fabric(height: int, width: int, spec: FabricSpec, seed: int, x0: float,
                cutline_x: float | None, wrap_wales: int | None, ss: int) -> np.ndarray:
    """Un-normalised fabric (float32, ~0..1.3), pixel (r, c) covering tube x in [x0+c, x0+c+1)."""
    p = float(spec.pitch_px)
    c = float(spec.course_px)
    irr = float(spec.irregularity)
    pique = spec.texture == "pique"
    lc = _leg_constants(p, c)

    # wale coordinate of every supersampled column (1-D: the cutline warp depends on x only)
    xs = x0 + (np.arange(width * ss, dtype=np.float64) + 0.5) / ss
    u = xs / p
    missing: list[int] = []
    if cutline_x is not None:
        m1 = int(math.floor(cutline_x / p - _CUTLINE_SEP / 2.0))
        missing = [m1, m1 + _CUTLINE_SEP + 1]
        u, gap_cols = _cutline_warp(u, missing)
    else:
        gap_cols = np.zeros(u.shape, dtype=bool)

    # per-loop random parameters, tabulated over the loops this window can touch
    k_lo = int(math.floor(u.min())) - 3
    k_hi = int(math.floor(u.max())) + 4
    j_lo = -3
    j_hi = int(math.ceil(height / c)) + 4
    nk, nj = k_hi - k_lo, j_hi - j_lo
    kk = np.arange(k_lo, k_hi)
    kh = (kk % wrap_wales) if wrap_wales else kk
    kg, jg = np.meshgrid(kh, np.arange(j_lo, j_hi), indexing="ij")
    ncell = nk * nj
    jx = (_hash01(seed, 1, kg, jg) - 0.5) * np.float32(1.1 * irr * p)
    jy = (_hash01(seed, 2, kg, jg) - 0.5) * np.float32(1.1 * irr * c)
    th = 1.0 + (_hash01(seed, 3, kg, jg) - 0.5) * np.float32(2.2 * irr)
    br = 1.0 + (_hash01(seed, 4, kg, jg) - 0.5) * np.float32(2.6 * irr)
    wide = np.zeros((nk, 1), dtype=np.float32)  # wales beside a missing needle spread wider
    for m in missing:
        if k_lo <= m < k_hi:
            br[m - k_lo, :] = 0.0
        for q in (m - 1, m + 1):
            if k_lo <= q < k_hi:
                wide[q - k_lo] = 1.0
    hw = np.float32(0.235 * p) * th * (1.0 + 0.25 * wide)
    xc = ((kk + 0.5) * p).astype(np.float32)[:, None] + jx  # wale centres
    y0 = (np.arange(j_lo, j_hi) * c).astype(np.float32)[None, :] + jy  # course tops
    # per-leg tables, left legs (side -1) then right legs (side +1), indexed by cell + side * ncell
    leg_gain = (1.0, 0.80)  # twisted yarn: the two legs of a V reflect light differently
    t_mx = np.concatenate([(xc - np.float32(lc["mx"])).ravel(), (xc + np.float32(lc["mx"])).ravel()])
    t_my = np.tile((y0 + np.float32(lc["my"])).ravel(), 2)
    t_ihw = np.tile((1.0 / hw).ravel(), 2).astype(np.float32)
    t_hws = np.tile((hw * np.float32(0.5 * ss)).ravel(), 2).astype(np.float32)
    t_brg = np.concatenate([(br * np.float32(leg_gain[0])).ravel(), (br * np.float32(leg_gain[1])).ravel()])
    h_x, h_y, h_b = xc.ravel(), (y0 + np.float32(0.16 * c)).ravel(), (br * np.float32(0.45)).ravel()
    dy = np.float32(lc["dy"])
    dx_side = (np.float32(-lc["dx"]), np.float32(lc["dx"]))
    lx, ly, lz = (np.float32(v) for v in _LIGHT)
    lp_side = tuple(-dy * lx + d * ly for d in dx_side)  # light along each leg's cross direction
    ihl2 = np.float32(1.0 / lc["hl"] ** 2)

    out = np.empty((height * ss, width * ss), dtype=np.float32)
    rows_per_chunk = max(ss, (1 << 19) // max(1, width * ss) // ss * ss)
    uf = u.astype(np.float32)[None, :]
    gapf = gap_cols[None, :]
    for r0 in range(0, height * ss, rows_per_chunk):
        r1 = min(height * ss, r0 + rows_per_chunk)
        ys = ((np.arange(r0, r1, dtype=np.float64) + 0.5) / ss).astype(np.float32)[:, None]
        vv = ys / np.float32(c)
        shape = (r1 - r0, width * ss)
        if pique:
            uu, vv, hole_dark, arc = _pique_warp(np.broadcast_to(uf, shape), np.broadcast_to(vv, shape), p, c)
        else:
            uu = np.broadcast_to(uf, shape)
            vv = np.broadcast_to(vv, shape)
        X = uu * np.float32(p)
        Y = vv * np.float32(c)
        k = np.floor(uu).astype(np.int32)
        j = np.floor(vv).astype(np.int32)
        right = (uu - k) > 0.5
        lower = (vv - j) > 0.5
        c0 = (k - k_lo) * nj + (j - j_lo)
        np.clip(c0, nj + 1, ncell - nj - 2, out=c0)
        dj = np.where(lower, 1, -1).astype(np.int32)
        # the neighbour wale on the right shows its left leg (side 0), the one on the left its right leg
        cn = c0 + np.where(right, nj, ncell - nj).astype(np.int32)
        dxn = np.where(right, dx_side[0], dx_side[1])
        lpn = np.where(right, lp_side[0], lp_side[1])
        acc: np.ndarray = np.full(shape, _BG, dtype=np.float32)
        cands = [(c0, 0), (c0, 1), (c0 + dj, 0), (c0 + dj, 1), (cn, None), (cn + dj, None)]
        dx: np.ndarray | np.float32
        lp: np.ndarray | np.float32
        for ci, side in cands:
            if side is None:
                dx, lp = dxn, lpn
            else:
                dx, lp = dx_side[side], lp_side[side]
                if side:
                    ci = ci + ncell
            rx = X - t_mx.take(ci)
            ry = Y - t_my.take(ci)
            t = rx * dx
            t += ry * dy
            n = ry * dx
            n -= rx * dy
            sn = n * t_ihw.take(ci)
            tn2 = t * t
            tn2 *= ihl2
            r2 = sn * sn
            r2 += tn2 * tn2
            alpha = 1.0 - r2
            alpha *= t_hws.take(ci)
            alpha += 0.5
            np.minimum(alpha, 1.0, out=alpha)
            np.clip(sn, -1.0, 1.0, out=sn)
            z = 1.0 - sn * sn
            np.sqrt(z, out=z)
            lam = sn * lp
            lam += z * lz
            np.clip(lam, 0.0, 1.0, out=lam)
            l4 = lam * lam
            l4 *= l4
            shade = 0.30 + 0.62 * lam
            shade += 0.30 * (l4 * l4)
            np.minimum(tn2, 1.0, out=tn2)
            shade *= 1.0 - 0.45 * tn2
            shade *= alpha
            shade *= t_brg.take(ci)
            np.maximum(acc, shade, out=acc)

        # the head of the loop below shows in the mouth of each V (fills it; the groove between
        # wales stays dark, which makes the wale - not the leg - the dominant horizontal period)
        hx = (X - h_x.take(c0)) * np.float32(1.0 / (0.24 * p))
        hy = (Y - h_y.take(c0)) * np.float32(1.0 / (0.30 * c))
        hr = hx * hx + hy * hy
        head = np.exp(-(hr * hr)) * h_b.take(c0)
        np.maximum(acc, head, out=acc)

        b = vv - j
        if pique:
            acc = acc * (1.0 - 0.88 * hole_dark) + np.float32(_BG) * hole_dark
            np.maximum(acc, arc, out=acc)

        # floats across the missing needles at the cutline: thin sagging yarns, one per course
        if missing:
            g = np.broadcast_to(gapf, shape)
            if g.any():
                fy = (b - 0.88) / 0.10
                flt = np.exp(-fy * fy).astype(np.float32) * np.float32(0.65)
                acc = np.where(g, np.maximum(np.float32(_BG * 0.6), flt), acc)

        # yarn fuzz: fine per-sample variation, stronger in the gaps (hairs)
        iy = np.arange(r0, r1)[:, None]
        ix = np.floor(xs * ss).astype(np.int64)[None, :]
        if wrap_wales:
            ix = ix % int(round(wrap_wales * p * ss))
        fz = _hash01(seed, 9, ix, iy) - np.float32(0.5)
        acc *= 1.0 + np.float32(0.16) * fz
        out[r0:r1] = acc

    img = cv2.resize(out, (width, height), interpolation=cv2.INTER_AREA) if ss > 1 else out

    _draw_hairs(img, spec, seed, x0, wrap_wales, k_range=(k_lo, k_hi), j_range=(j_lo, j_hi))

    # barre: the yarn of each course varies slowly in thickness/lustre along its length
    img *= _course_streaks(height, width, spec, seed, x0, wrap_wales)
    return img


def _pique_warp(u: np.ndarray, v: np.ndarray, p: float, c: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pique: tuck loops on alternate needles, offset every second course pair (honeycomb).

    Returns warped (u, v) at which the plain loops are sampled, the darkening of the tuck holes
    and the bright arcs of the held tuck loops."""
    du = np.zeros(u.shape, dtype=np.float32)
    dv = np.zeros(u.shape, dtype=np.float32)
    dark = np.zeros(u.shape, dtype=np.float32)
    arc = np.zeros(u.shape, dtype=np.float32)
    r_base = np.floor((v - 1.0) / 2.0)
    for dr in (0.0, 1.0):
        r = r_base + dr
        vh = 2.0 * r + 1.0
        o = np.mod(r, 2.0)
        uh = 2.0 * np.round((u - o - 0.5) / 2.0) + o + 0.5
        dx = (u - uh) * np.float32(p)
        dy = (v - vh) * np.float32(c)
        qx = dx / np.float32(0.95 * p)
        qy = dy / np.float32(1.05 * c)
        rho2 = qx * qx + qy * qy
        w = np.exp(-rho2 * rho2)
        du += np.float32(0.42) * (dx / np.float32(p)) * w
        dv += np.float32(0.42) * (dy / np.float32(c)) * w
        hx = dx / np.float32(0.30 * p)
        hy = (dy - np.float32(0.08 * c)) / np.float32(0.40 * c)
        dark = np.maximum(dark, np.exp(-((hx * hx + hy * hy) ** 1.5)))
        ex = dx / np.float32(0.62 * p)
        ey = (dy + np.float32(0.05 * c)) / np.float32(0.72 * c)
        re = np.sqrt(ex * ex + ey * ey)
        upper = 1.0 / (1.0 + np.exp((dy + np.float32(0.05 * c)) / np.float32(0.12 * c)))
        ring = np.exp(-(((re - 1.0) / 0.28) ** 2)) * upper
        arc = np.maximum(arc, ring * (0.72 + 0.28 * np.clip(-ey, 0.0, 1.0)))
    return (u - du).astype(np.float32), (v - dv).astype(np.float32), dark, arc.astype(np.float32)


def _draw_hairs(img: np.ndarray, spec: FabricSpec, seed: int, x0: float, wrap_wales: int | None,
                k_range: tuple[int, int], j_range: tuple[int, int]) -> None:
    """Stray fibres sticking out of the yarn (hairiness), anchored to loops so windows agree."""
    p, c = spec.pitch_px, spec.course_px
    kg, jg = np.meshgrid(np.arange(*k_range), np.arange(*j_range), indexing="ij")
    kh = (kg % wrap_wales) if wrap_wales else kg
    density = 0.035 + 0.25 * spec.irregularity
    sel = _hash01(seed, 20, kh, jg) < density
    if not sel.any():
        return
    ks, js, khs = kg[sel], jg[sel], kh[sel]
    hv = np.stack([_hash01(seed, 21 + i, khs, js) for i in range(5)], axis=1).astype(np.float64)
    canvas = np.zeros(img.shape[:2], dtype=np.uint8)
    shift = 4  # cv2 sub-pixel bits: 1/16 px
    for (k, j), (fx, fy, fa, fl, fb) in zip(zip(ks.tolist(), js.tolist(), strict=True), hv, strict=True):
        bx = (k + fx) * p - x0
        by = (j + fy) * c
        ang = fa * 2.0 * math.pi
        ln = (0.6 + 1.2 * fl) * p
        bend = (fb - 0.5) * 1.2
        pts = [(bx + math.cos(ang + bend * s) * ln * s, by + math.sin(ang + bend * s) * ln * s)
               for s in (0.0, 0.5, 1.0)]
        arr = np.round(np.array(pts) * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [arr], False, 255, 1, cv2.LINE_AA, shift)
    np.maximum(img, canvas.astype(np.float32) * np.float32(0.42 / 255.0), out=img)


def _course_streaks(height: int, width: int, spec: FabricSpec, seed: int, x0: float,
                    wrap_wales: int | None) -> np.ndarray:
    """Multiplicative barre field: each course's yarn varies slowly along the course."""
    p, c, irr = spec.pitch_px, spec.course_px, spec.irregularity
    block_wales = 24.0
    if wrap_wales:
        n_blocks = max(1, int(round(wrap_wales / block_wales)))
        block_px = wrap_wales * p / n_blocks
    else:
        n_blocks = 0
        block_px = block_wales * p
    xb = (x0 + np.arange(width, dtype=np.float64) + 0.5) / block_px
    b0 = np.floor(xb).astype(np.int64)
    t = _smooth((xb - b0).astype(np.float32))
    b1 = b0 + 1
    if n_blocks:
        b0, b1 = b0 % n_blocks, b1 % n_blocks
    j = np.floor((np.arange(height, dtype=np.float64) + 0.5) / c).astype(np.int64)[:, None]
    v0 = _hash01(seed, 30, b0[None, :], j)
    v1 = _hash01(seed, 30, b1[None, :], j)
    along = v0 + (v1 - v0) * t[None, :] - 0.5
    whole = _hash01(seed, 31, j) - 0.5
    return (1.0 + irr * (1.5 * along + 0.8 * whole)).astype(np.float32)


def _default_ss(spec: FabricSpec) -> int:
    return 3 if spec.pitch_px < 5.0 else 2


@lru_cache(maxsize=64)
def _ref_stats(texture: str, pitch: float, ratio: float, irr: float, ss: int) -> tuple[float, float]:
    """Mean of the raw render (for brightness normalisation) and the wale phase offset."""
    spec = FabricSpec(texture=texture, pitch_px=pitch, course_ratio=ratio, irregularity=irr)
    n = 16
    w = int(math.ceil(n * pitch))
    h = int(math.ceil(n * spec.course_px))
    raw = _raw_fabric(h, w, spec, 12345, 0.0, None, None, ss)
    prof = raw.mean(axis=0).astype(np.float64)
    xs = np.arange(w) + 0.5
    z = np.sum((prof - prof.mean()) * np.exp(-2j * np.pi * xs / pitch))
    bright_x = (np.angle(z) / (2 * np.pi) * pitch) % pitch  # where the fundamental peaks
    offset = (bright_x - 0.5 * pitch) % pitch  # relative to the wale centre (k + 0.5) * p
    return float(raw.mean()), float(offset)


def _tint(seed: int) -> np.ndarray:
    """A dyed-yarn colour (BGR multipliers with unit luminance), chosen by the seed."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7117])
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(60, 150), 200]]], dtype=np.uint8)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)
    lum = 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]
    return (bgr / max(lum, 1.0)).astype(np.float32)


def _clean_float(height: int, width: int, spec: FabricSpec, seed: int, x_offset: float,
                 cutline_x: float | None, wrap_wales: int | None = None, ss: int | None = None,
                 tint_seed: int | None = None) -> np.ndarray:
    """Noise-free fabric: normalised, blurred by the optics, tinted. float32 (H, W[, 3])."""
    ss = ss or _default_ss(spec)
    margin = int(math.ceil(4.0 * spec.blur_sigma)) + 1 if spec.blur_sigma > 0 else 0
    raw = _raw_fabric(height, width + 2 * margin, spec, seed, float(x_offset) - margin, cutline_x, wrap_wales, ss)
    mean, _ = _ref_stats(spec.texture, spec.pitch_px, spec.course_ratio, spec.irregularity, ss)
    g: np.ndarray = np.float32(spec.brightness) * (1.0 + np.float32(spec.contrast) * (raw / np.float32(mean) - 1.0))
    if spec.blur_sigma > 0:
        g = cv2.GaussianBlur(g, (0, 0), spec.blur_sigma, borderType=cv2.BORDER_REFLECT)
    g = g[:, margin:margin + width]
    if spec.color:
        g = g[:, :, None] * _tint(seed if tint_seed is None else tint_seed)[None, None, :]
    return np.ascontiguousarray(g, dtype=np.float32)


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _add_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return img.copy()
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return _to_u8(img.astype(np.float32) + noise)


def _noise_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x5E4])


def render_fabric(height: int, width: int, spec: FabricSpec, seed: int, *, x_offset: int = 0,
                  cutline_x: int | None = None) -> np.ndarray:
    """Defect-free fabric as a camera sees it (uint8, ``(H, W)`` or ``(H, W, 3)`` BGR).

    ``x_offset`` shifts the web: column ``c`` shows tube coordinate ``x_offset + c``, so windows at
    different offsets show the same loops (the sensor noise, a camera property, is not shifted).
    ``cutline_x`` (tube coordinate) puts the cutline there - the two needles left out, one either
    side of it, ``_CUTLINE_SEP`` wales apart - when it falls inside the view."""
    _check_size(height, width)
    clean = _to_u8(_clean_float(height, width, spec, seed, x_offset, cutline_x))
    return _add_noise(clean, spec.noise_sigma, _noise_rng(seed))


def cutline_halfwidth(spec: FabricSpec) -> float:
    """Half the width (pixels) of the band a cutline disturbs, around its ``cutline_x``."""
    return (_CUTLINE_SEP / 2.0 + 2.5) * spec.pitch_px


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, not {height}x{width}")


# --------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------


def _gray_of(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    return img[..., 0] * np.float32(0.114) + img[..., 1] * np.float32(0.587) + img[..., 2] * np.float32(0.299)


def _level(gray: np.ndarray, cx: float, cy: float, r: float) -> float:
    h, w = gray.shape
    r = max(4, int(r))
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
    if x1 <= x0 or y1 <= y0:
        return float(gray.mean())
    return float(gray[y0:y1, x0:x1].mean())


def _snap_to_wale(gray: np.ndarray, x: float, spec: FabricSpec) -> float:
    """The wale centre nearest to x, from the phase of the image's horizontal period."""
    p = spec.pitch_px
    prof = gray.mean(axis=0).astype(np.float64)
    xs = np.arange(prof.size) + 0.5
    z = np.sum((prof - prof.mean()) * np.exp(-2j * np.pi * xs / p))
    if abs(z) < 1e-9:
        return float(x)
    _, offset = _ref_stats(spec.texture, p, spec.course_ratio, spec.irregularity, _default_ss(spec))
    centre_phase = ((np.angle(z) / (2 * np.pi) * p) - offset) % p
    return float(centre_phase + round((x - centre_phase) / p) * p)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx + np.float32(0.5), yy + np.float32(0.5)


def _draw_aa(shape: tuple[int, int], polys: Sequence[npt.ArrayLike], thickness: float, sc: int = 4) -> np.ndarray:
    """Anti-aliased open polylines (points in pixel units) as coverage 0..1, float32 (H, W)."""
    h, w = shape
    big = np.zeros((h * sc, w * sc), dtype=np.uint8)
    t = max(1, int(round(thickness * sc)))
    for pts in polys:
        arr = np.round(np.asarray(pts, dtype=np.float64) * sc * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(big, [arr], False, 255, t, cv2.LINE_AA, 4)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / np.float32(255.0)


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return layer
    return cv2.GaussianBlur(layer, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _defect_hole(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                 cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p, c = spec.pitch_px, spec.course_px
    h, w = gray.shape
    rx = max(1.6, p * (1.1 + 0.8 * rng.random()) * size)
    ry = max(2.2, c * (1.8 + 1.8 * rng.random()) * size)
    harm = [(m, rng.uniform(-0.12, 0.12), rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4)]
    xx, yy = _grid(h, w)
    dx, dy = (xx - cx) / rx, (yy - cy) / ry
    theta = np.arctan2(dy, dx)
    rad = np.ones_like(theta)
    for m, amp, ph in harm:
        rad += np.float32(amp) * np.cos(m * theta + ph)
    rho = np.sqrt(dx * dx + dy * dy) / rad
    alpha = np.clip((1.0 - rho) * np.float32(min(rx, ry)) + 0.5, 0.0, 1.0)
    level = _level(gray, cx, cy, 3 * max(rx, ry))
    dark = level * (0.06 + 0.12 * (1.0 - min(1.0, intensity)))
    base: np.ndarray = np.full((h, w), dark, dtype=np.float32)
    base *= 1.0 + 0.25 * (rng.random((h, w), dtype=np.float32) - 0.5)
    # the torn rim: loops curling into the hole, in shadow
    rim = np.clip(1.0 - (1.0 - rho) * np.float32(min(rx, ry)) / np.float32(0.45 * p + 0.5), 0.0, 1.0)
    base += (np.float32(0.5) * _gray_of(img) - base) * (rim * rim)
    # broken loops: yarn ends curling into the hole, and a float or two still crossing it
    polys = []
    for _ in range(int(rng.integers(2, 5))):
        a0 = rng.uniform(0, 2 * np.pi)
        px_, py_ = cx + np.cos(a0) * rx * 1.05, cy + np.sin(a0) * ry * 1.05
        ln = rng.uniform(0.35, 0.75)
        bend = rng.uniform(-1.2, 1.2)
        pts = [(px_ + (cx - px_) * ln * s + np.sin(bend * s * 3) * p * 0.3 * s, py_ + (cy - py_) * ln * s)
               for s in np.linspace(0, 1, 6)]
        polys.append(pts)
    for _ in range(int(rng.integers(0, 3))):
        yr = cy + rng.uniform(-0.7, 0.7) * ry
        polys.append([(cx - rx * 1.1, yr), (cx, yr + 0.25 * c), (cx + rx * 1.1, yr)])
    yarn = _draw_aa((h, w), polys, max(1.0, 0.3 * p))
    base = base * (1.0 - yarn) + yarn * np.float32(level * 1.05)
    return _blur(base, spec.blur_sigma), alpha


def _defect_ladder(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                   cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p, c = spec.pitch_px, spec.course_px
    h, w = gray.shape
    xw = _snap_to_wale(gray, cx, spec)
    half_w = p * (0.55 + 0.12 * min(size, 2.0))
    length = max(3 * c, c * (7.0 + 9.0 * rng.random()) * size)
    y_t, y_b = cy - length / 2, cy + length / 2
    xx, yy = _grid(h, w)
    along = np.clip(np.minimum(yy - y_t, y_b - yy) / np.float32(0.12 * length + c), 0.0, 1.0)
    hw = np.float32(half_w) * (0.35 + 0.65 * along)
    inside_y = np.clip(np.minimum(yy - y_t, y_b - yy) + 0.5, 0.0, 1.0)
    alpha = np.clip(hw - np.abs(xx - xw) + 0.5, 0.0, 1.0) * inside_y
    level = _level(gray, xw, cy, length / 2)
    base = np.full((h, w), level * (0.06 + 0.12 * (1.0 - min(1.0, intensity))), dtype=np.float32)
    # rungs: the sinker loops / floats that still cross the run, one per course, sagging
    phase = rng.random()
    xn = np.clip((xx - xw) / np.float32(half_w), -1.0, 1.0)
    vv = (yy - y_t) / np.float32(c) - np.float32(phase) - np.float32(0.18) * (1.0 - xn * xn)
    dv = vv - np.round(vv)
    rung_w = 0.13 + 0.25 / c
    bright = 0.55 + 0.35 * _hash01(int(rng.integers(1 << 30)), 1, np.round(vv).astype(np.int64))
    rung = np.exp(-((dv / np.float32(rung_w)) ** 2)) * bright * np.float32(level * 1.1)
    base = np.maximum(base, rung.astype(np.float32))
    return _blur(base, spec.blur_sigma), alpha


def _defect_needle_line(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                        cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p, c = spec.pitch_px, spec.course_px
    h, w = gray.shape
    xw = _snap_to_wale(gray, cx, spec)
    half_w = p * (0.55 + 0.15 * min(size, 2.0))
    sx = 1.0 + 0.5 * intensity
    sy = 1.0 + 0.3 * intensity
    y0 = rng.uniform(0, h)
    xx, yy = _grid(h, w)
    map_x = (np.float32(xw) + (xx - np.float32(xw)) / np.float32(sx) - 0.5).astype(np.float32)
    map_y = (np.float32(y0) + (yy - np.float32(y0)) / np.float32(sy) - 0.5).astype(np.float32)
    layer = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    sign = 1.0 if rng.random() < 0.7 else -1.0
    ph = rng.uniform(0, 2 * np.pi)
    ycol = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    slow = np.sin(2 * np.pi * ycol / (c * rng.uniform(9, 25)) + ph)
    loop = np.sin(2 * np.pi * ycol / (c * sy) + ph)
    gain = 1.0 + sign * 0.38 * intensity * (0.75 + 0.15 * slow + 0.1 * loop)
    layer = layer * (gain[..., None] if layer.ndim == 3 else gain)
    alpha = np.clip(np.float32(half_w) - np.abs(xx - np.float32(xw)) + 0.5, 0.0, 1.0)
    return layer.astype(np.float32), alpha


def _defect_tension(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                    cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p, c = spec.pitch_px, spec.course_px
    h, w = gray.shape
    half_h = max(1.5, c * (1.0 + 1.0 * rng.random()) * size)
    half_len = p * (15.0 + 15.0 * rng.random()) * size
    xx, yy = _grid(h, w)
    stretch = 1.0 + 0.4 * intensity
    wob = 0.16 * p * intensity
    ph = rng.uniform(0, 2 * np.pi)
    map_y = np.float32(cy) + (yy - np.float32(cy)) / np.float32(stretch)
    map_x = xx + np.float32(wob) * np.sin(2 * np.pi * (yy - cy) / np.float32(1.6 * c) + np.float32(ph))
    layer = cv2.remap(img, (map_x - 0.5).astype(np.float32), (map_y - 0.5).astype(np.float32),
                      cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    level = _level(gray, cx, cy, 4 * half_h)
    layer = np.float32(level * (1.0 - 0.12 * intensity)) + (layer - np.float32(level)) * np.float32(
        1.0 + 0.35 * intensity)
    ay = np.clip(np.float32(half_h) - np.abs(yy - np.float32(cy)) + 0.5, 0.0, 1.0)
    ax = np.clip((np.float32(half_len) - np.abs(xx - np.float32(cx))) / np.float32(2.0 * p), 0.0, 1.0)
    return layer.astype(np.float32), ay * ax


def _defect_oil(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p = spec.pitch_px
    h, w = gray.shape
    radius = max(3.0, p * (2.2 + 2.5 * rng.random()) * size)
    # work in a box around the stain (the field is ~0 outside it)
    r_box = int(math.ceil(1.7 * radius)) + 4
    bx0, by0 = max(0, int(cx) - r_box), max(0, int(cy) - r_box)
    bx1, by1 = min(w, int(cx) + r_box + 1), min(h, int(cy) + r_box + 1)
    alpha = np.zeros((h, w), dtype=np.float32)
    core = np.zeros((h, w), dtype=np.float32)
    if bx1 > bx0 and by1 > by0:
        xx, yy = _grid(by1 - by0, bx1 - bx0)
        xx += np.float32(bx0 - cx)
        yy += np.float32(by0 - cy)
        field = np.zeros(xx.shape, dtype=np.float32)
        for i in range(int(rng.integers(5, 10))):
            ox, oy = (rng.uniform(-0.55, 0.55, 2) * radius) if i else (0.0, 0.0)
            sg = radius * rng.uniform(0.28, 0.5)
            wgt = rng.uniform(0.5, 1.0)
            field += np.float32(wgt) * np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / np.float32(2 * sg * sg))
        field /= max(float(field.max()), 1e-6)
        # ragged rim: low-frequency noise
        g = rng.standard_normal((6, 6)).astype(np.float32)
        field += 0.12 * cv2.resize(g, (xx.shape[1], xx.shape[0]), interpolation=cv2.INTER_CUBIC)
        alpha[by0:by1, bx0:bx1] = _smooth(np.clip((field - 0.28) / 0.22, 0.0, 1.0))
        core[by0:by1, bx0:bx1] = np.clip((field - 0.45) / 0.5, 0.0, 1.0)
    k = float(min(1.2, intensity))
    soft = cv2.GaussianBlur(img, (0, 0), max(0.8, 0.25 * p))
    layer = 0.65 * img + 0.35 * soft  # the oil flattens the yarn lustre
    dark = np.float32(k) * (0.42 + 0.25 * core)
    if img.ndim == 3:
        tint = np.array([1.15, 1.0, 0.8], dtype=np.float32)  # brownish: blue falls most
        factor = np.clip(1.0 - dark[..., None] * tint[None, None, :], 0.05, 1.0)
    else:
        factor = np.clip(1.0 - dark, 0.05, 1.0)
    return (layer * factor).astype(np.float32), alpha


def _defect_slub(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                 cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p, c = spec.pitch_px, spec.course_px
    h, w = gray.shape
    half_len = max(2.5, p * (2.2 + 1.8 * rng.random()) * size)
    thick = max(1.5, c * (0.6 + 0.3 * rng.random()) * size)
    xx, yy = _grid(h, w)
    ph = rng.uniform(0, 2 * np.pi)
    yc = np.float32(cy) + np.float32(0.10 * c) * np.sin(2 * np.pi * (xx - cx) / np.float32(p) + np.float32(ph))
    tx = np.clip(1.0 - ((xx - cx) / np.float32(half_len)) ** 2, 0.0, 1.0)
    lump = 1.0 + 0.25 * np.sin(2 * np.pi * (xx - cx) / np.float32(half_len * 0.8) + np.float32(ph * 2))
    thick_x = np.float32(thick) * tx**0.35 * lump
    sn = (yy - yc) / np.maximum(thick_x, np.float32(1e-3))
    alpha = np.clip((1.0 - np.abs(sn)) * thick_x + 0.5, 0.0, 1.0) * (tx > 0)
    snc = np.clip(sn, -1.0, 1.0)
    shade = 0.55 + 0.45 * np.sqrt(1.0 - snc * snc) - 0.18 * snc
    fib = 1.0 + 0.12 * np.sin(2 * np.pi * (0.8 * xx + 1.6 * yy) / np.float32(2.3))
    fib *= 1.0 + 0.12 * (rng.random((h, w), dtype=np.float32) - 0.5)
    level = _level(gray, cx, cy, 3 * half_len)
    val = np.clip(np.float32(level * (1.35 + 0.3 * intensity)) * shade * fib, 0, 252)
    if img.ndim == 3:
        local = img[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))].astype(np.float32)
        tint = local / max(float(_gray_of(local[None, None])[0, 0]), 1.0)
        layer = val[..., None] * tint[None, None, :]
    else:
        layer = val
    return _blur(layer.astype(np.float32), spec.blur_sigma), alpha.astype(np.float32)


def _defect_fly(img: np.ndarray, gray: np.ndarray, rng: np.random.Generator, spec: FabricSpec,
                cx: float, cy: float, size: float, intensity: float) -> tuple[np.ndarray, np.ndarray]:
    p = spec.pitch_px
    h, w = gray.shape
    length = max(6.0, p * (8.0 + 12.0 * rng.random()) * size)
    n = 24
    ang = rng.uniform(0, 2 * np.pi)
    turn = rng.normal(0, 0.18, n).cumsum() + rng.uniform(-0.08, 0.08) * np.arange(n)
    step = length / (n - 1)
    pts = [(0.0, 0.0)]
    for i in range(1, n):
        a = ang + turn[i]
        pts.append((pts[-1][0] + np.cos(a) * step, pts[-1][1] + np.sin(a) * step))
    arr = np.array(pts)
    arr += np.array([cx, cy]) - arr.mean(axis=0)
    cov = _draw_aa((h, w), [arr], max(0.9, 0.2 * p)) * np.float32(min(1.0, 0.95 * intensity + 0.05))
    level = _level(gray, cx, cy, length)
    lum = level * 0.3 if level > 105 else min(245.0, level * 1.8 + 45.0)
    if img.ndim == 3:
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(120, 255), 220]]], dtype=np.uint8)
        col = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
        col *= lum / max(float(_gray_of(col[None, None])[0, 0]), 1.0)
        layer = np.broadcast_to(np.clip(col, 0, 255)[None, None, :], img.shape).astype(np.float32)
    else:
        layer = np.full((h, w), lum, dtype=np.float32)
    return layer, cov


_DEFECTS = {
    "hole": _defect_hole,
    "ladder": _defect_ladder,
    "needle_line": _defect_needle_line,
    "tension_stripe": _defect_tension,
    "oil_stain": _defect_oil,
    "slub": _defect_slub,
    "fly": _defect_fly,
}


def defect_extent(kind: str, spec: FabricSpec, size: float = 1.0) -> tuple[float, float]:
    """Upper bounds (half-width, half-height) in pixels of a defect's footprint around its centre
    (``inf`` half-height: the defect runs the full height, as a needle line does)."""
    p, c = spec.pitch_px, spec.course_px
    s = max(size, 0.0)
    table = {
        "hole": (p * 1.9 * s * 1.4 + 3, c * 3.6 * s * 1.4 + 3),
        "ladder": (p * 0.9 * max(s, 1) + 3, c * 8.0 * s + 2 * c + 3),
        "needle_line": (p * 0.9 * max(s, 1) + 3, math.inf),
        "tension_stripe": (p * 30.0 * s + 3, c * 2.0 * s + 3),
        "oil_stain": (p * 4.7 * s * 1.7 + 4, p * 4.7 * s * 1.7 + 4),
        "slub": (p * 4.0 * s + 3, c * 1.2 * s + 0.2 * c + 4),
        "fly": (p * 20.0 * s * 0.75 + 4, p * 20.0 * s * 0.75 + 4),
    }
    if kind not in table:
        raise ValueError(f"unknown defect kind {kind!r}; one of {DEFECT_KINDS}")
    return table[kind]


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator, spec: FabricSpec, *,
               center: tuple[int, int] | None = None, size: float = 1.0, intensity: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on ``image`` (not modified); return ``(new image, mask)``.

    ``center`` is ``(x, y)`` (random inside the image when None); ``size`` scales the footprint
    and ``intensity`` the strength (1.0: typical). The mask (uint8 0/255, ``(H, W)``) marks the
    defect's region - every pixel where the defect's coverage is at least ``_MASK_THRESHOLD``; pixels
    outside it change by a sliver of soft edge at most (within ~2 px of the mask, oil stains ~4 px),
    and pixels beyond that are left bit-identical. Best applied to noise-free fabric, with sensor
    noise added afterwards (as :func:`render_sample` and :class:`KnitStream` do)."""
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; one of {DEFECT_KINDS}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3), not {image.shape}")
    h, w = image.shape[:2]
    if center is None:
        ex, ey = defect_extent(kind, spec, size)
        mx = min(ex * 0.5, w / 2.0 - 1)
        my = min(ey * 0.5, h / 2.0 - 1) if math.isfinite(ey) else 0.0
        center = (int(rng.uniform(mx, w - mx)), int(rng.uniform(my, h - my)))
    cx, cy = float(center[0]) + 0.5, float(center[1]) + 0.5
    img = image.astype(np.float32)
    gray = _gray_of(img)
    layer, alpha = _DEFECTS[kind](img, gray, rng, spec, cx, cy, float(size), float(intensity))
    alpha = np.where(alpha < _ALPHA_FLOOR, np.float32(0.0), alpha).astype(np.float32)
    a = alpha[..., None] if img.ndim == 3 else alpha
    if layer.ndim == 2 and img.ndim == 3:
        layer = layer[..., None]
    out = img + (layer - img) * a
    new = _to_u8(out)
    new = np.where((a > 0), new, image)
    mask = np.where(alpha >= _MASK_THRESHOLD, 255, 0).astype(np.uint8)
    return new.astype(np.uint8), mask


# --------------------------------------------------------------------------------------------------
# Samples and data sets
# --------------------------------------------------------------------------------------------------


def render_labelled_sample(height: int, width: int, spec: FabricSpec, seed: int, defect: str | None, cutline: bool,
                           illumination: float, defect_kw: dict, tint_seed: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One picture with its mask and what was drawn (``info``: the defect's box, ``cutline_box``), with an
    optional lighting gradient of strength ``illumination``; the data set writer's building block."""
    _check_size(height, width)
    info: dict = {}
    cut_x = None
    if cutline:
        crng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0xC07])
        cut_x = float(crng.uniform(0.12, 0.88) * width)
        half = cutline_halfwidth(spec)
        info["cutline_box"] = (max(0, int(cut_x - half)), 0, min(width, int(math.ceil(cut_x + half))), height)
    img = _to_u8(_clean_float(height, width, spec, seed, 0, cut_x, tint_seed=tint_seed))
    mask = np.zeros((height, width), dtype=np.uint8)
    if defect is not None:
        drng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0xDEF])
        img, mask = add_defect(img, defect, drng, spec, **defect_kw)
    if illumination > 0:
        irng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x111])
        gx, gy = irng.uniform(-illumination, illumination, 2)
        ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
        xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
        field = 1.0 + np.float32(gx) * xs[None, :] + np.float32(gy) * ys[:, None]
        img = _to_u8(img.astype(np.float32) * (field[..., None] if img.ndim == 3 else field))
    return _add_noise(img, spec.noise_sigma, _noise_rng(seed)), mask, info


def render_sample(height: int, width: int, spec: FabricSpec, seed: int, defect: str | None = None,
                  cutline: bool = False, **defect_kw: object) -> tuple[np.ndarray, np.ndarray]:
    """One camera picture and its defect mask (all 0 without a defect).

    Without defect and cutline it equals :func:`render_fabric` with the same seed, and with a
    defect it differs from that only inside (the soft edge of) the mask: the sensor noise is the
    same. ``cutline=True`` puts a cutline at a seed-chosen column (sometimes only partly in view).
    ``defect_kw`` goes to :func:`add_defect` (``center``, ``size``, ``intensity``)."""
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {defect!r}; one of {DEFECT_KINDS}")
    img, mask, _ = render_labelled_sample(height, width, spec, seed, defect, cutline, 0.0, dict(defect_kw))
    return img, mask


# --------------------------------------------------------------------------------------------------
# The stream: the fabric tube turning past a fixed camera
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledDefect:
    """A defect that a :class:`KnitStream` injects.

    ``frame``: the first frame it is on the web entering the view (it appears at the right edge
    and travels left). ``every_revolution``: it stays on the tube and comes back every revolution
    (a broken needle); otherwise it passes the camera once. ``y``: its centre row (random if None;
    ignored for needle lines, which run the whole height)."""

    kind: str
    frame: int
    every_revolution: bool = False
    size: float = 1.0
    intensity: float = 1.0
    y: int | None = None


@dataclass
class FrameTruth:
    """What is really in a :class:`KnitStream` frame."""

    index: int
    revolution: int
    cutline_visible: bool
    cutline_box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in frame pixels (x1, y1 exclusive)
    defects: list[dict]  # [{"kind", "box": (x0, y0, x1, y1), "id", "every_revolution"}] visible here
    mask: np.ndarray  # uint8 0/255 HxW, defect pixels only (cutline is NOT a defect)
    # where the frame lies on the tube: tube column of the frame's column 0 (0 .. circumference - 1),
    # the circumference and the cutline's tube column (a region at frame column x is at tube column
    # (offset_px + x) mod circumference_px)
    offset_px: int = 0
    circumference_px: int = 0
    cutline_px: int = 0


@dataclass
class _Patch:
    """Something painted on the tube: ``pixels`` replace the tube where ``changed`` is set."""

    x0: int  # unwrapped tube column of the patch's left edge (first appearance)
    y0: int
    pixels: np.ndarray
    changed: np.ndarray  # bool (h, w)
    mask: np.ndarray | None  # uint8 0/255 (h, w); None for the cutline
    kind: str = "cutline"
    ident: int = -1
    every_revolution: bool = True
    first_frame: int = 0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # mask bbox within the patch (x0, y0, x1, y1)


_TUBE_CAP_PIXELS = 24_000_000  # ~12 s to render on one core, 24 MB gray (72 MB colour)


class KnitStream:
    """The fabric tube turning past a fixed camera.

    The tube circumference is ``C = round(speed_px * revolution_frames)`` pixels; frame ``i`` shows
    tube columns ``round(i * speed_px) .. + width`` (mod ``C``), so the web moves right to left. The
    tube carries an integer number of wales (the pitch is adjusted by well under 1 %). The clean
    tube texture is rendered once (``C x height``, ~0.5 s per million pixels on one core; above 24
    million pixels a period of it that divides ``C`` is rendered and repeated - when ``C`` has no
    divisor between ``width`` and that cap, all of it is rendered); the cutline - a fixed tube position, seen once per
    revolution - and the defects are patches pasted over it. Per frame: slice, paste, lighting
    (slow global gain drift, a drifting illumination gradient and a fixed vignette, all scaled by
    ``lighting_drift``) and sensor noise (``spec.noise_sigma``, from a pre-drawn pool at a per-frame
    offset). ``frame(i)`` is a pure function of ``(constructor arguments, i)``.

    Defects: a :class:`ScheduledDefect` at frame ``f`` is painted on the tube where the web enters
    the view at frame ``f``. A one-shot defect passes the camera once (by the next revolution the
    take-down has pulled that fabric below the camera, so it is not seen again); with
    ``every_revolution=True`` it stays and comes back every revolution from ``f`` on (a broken needle's
    line, which the needle makes afresh each turn). ``random_defect_rate`` is the expected number of
    one-shot random defects (kinds drawn from :data:`DEFECT_KINDS`) entering per frame.
    """

    def __init__(self, width: int = 1280, height: int = 1024, spec: FabricSpec = FabricSpec(), *,
                 seed: int = 0, speed_px: float = 40.0, fps: float = 10.0, revolution_frames: int = 200,
                 defects: Sequence[ScheduledDefect] = (), random_defect_rate: float = 0.0,
                 lighting_drift: float = 0.05) -> None:
        _check_size(height, width)
        if speed_px <= 0 or revolution_frames < 1 or fps <= 0:
            raise ValueError("speed_px, revolution_frames and fps must be positive")
        if random_defect_rate < 0 or lighting_drift < 0:
            raise ValueError("random_defect_rate and lighting_drift must not be negative")
        for d in defects:
            if d.kind not in DEFECT_KINDS:
                raise ValueError(f"unknown defect kind {d.kind!r}; one of {DEFECT_KINDS}")
            if d.frame < 0:
                raise ValueError("a scheduled defect's frame must be >= 0")
        self.width, self.height = int(width), int(height)
        self.seed = int(seed)
        self.speed_px = float(speed_px)
        self.fps = float(fps)
        self.revolution_frames = int(revolution_frames)
        self.random_defect_rate = float(random_defect_rate)
        self.lighting_drift = float(lighting_drift)
        self.scheduled = tuple(defects)
        self.circumference = max(1, int(round(self.speed_px * self.revolution_frames)))
        C, H, W = self.circumference, self.height, self.width
        ch = 3 if spec.color else 1

        # texture period: all of C if it is small enough, else the largest divisor of C that is
        # (preferably two frame widths or more, at least one)
        period = C
        if C * H > _TUBE_CAP_PIXELS:
            limit = max(1, _TUBE_CAP_PIXELS // H)
            divs = [C // m for m in range(2, C // max(1, W) + 1) if C % m == 0 and W <= C // m <= limit]
            if divs:
                wide = [d for d in divs if d >= 2 * W]
                period = max(wide or divs)
        self.period = period
        self.wales = max(1, int(round(period / spec.pitch_px)))
        self.spec = replace(spec, pitch_px=period / self.wales)
        self._ss = _default_ss(self.spec)
        self._tube = _to_u8(_clean_float(H, period, self.spec, self.seed, 0, None, self.wales, self._ss))

        # the cutline: at a fixed tube position, out of view at frame 0 when the tube allows it
        half = cutline_halfwidth(self.spec)
        self.cutline_x = int((W + (C - W) / 2.0) % C) if C > W + 2 * half + 2 else C // 2
        self._cutline = self._render_cutline(self.cutline_x, half)

        # lighting: fixed vignette + smooth slow drifts
        lrng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x1167])
        self._light_params = lrng.uniform(0, 2 * np.pi, 6)
        self._light_periods = lrng.uniform(0.8, 1.25, 4) * np.array([900.0, 260.0, 700.0, 520.0])
        xs = (np.arange(W, dtype=np.float32) + 0.5) / W - 0.5
        ys = (np.arange(H, dtype=np.float32) + 0.5) / H - 0.5
        self._xs, self._ys = xs[None, :] * 2, ys[:, None] * 2
        r2 = self._xs**2 + (self._ys * (H / max(W, 1))) ** 2
        self._vignette = (1.0 - 1.2 * self.lighting_drift * r2).astype(np.float32)
        # sensor noise pool
        n = H * W * ch
        self._noise_pool = (np.random.default_rng([self.seed & 0xFFFFFFFF, 0x401]).standard_normal(
            n + 65521, dtype=np.float32) * np.float32(spec.noise_sigma)) if spec.noise_sigma > 0 else None

        self._sched_patches: dict[int, _Patch] = {}
        self._random_cache: OrderedDict[tuple[int, int], _Patch] = OrderedDict()
        ex = max(defect_extent(k, self.spec, 2.0)[0] for k in DEFECT_KINDS)
        self._lookback = int(math.ceil((W + 2 * ex + 16) / self.speed_px)) + 2

    # -- geometry ------------------------------------------------------------------------------
    def _start(self, index: int) -> int:
        """Unwrapped tube column at the left edge of frame ``index``."""
        return int(round(index * self.speed_px))

    def _tube_window(self, x0: int, w: int, cut_boxes: list | None = None) -> np.ndarray:
        """Clean tube (with the cutline) for unwrapped tube columns x0 .. x0 + w."""
        P = self.period
        s = x0 % P
        win = self._tube[:, s:s + w].copy() if s + w <= P else self._tube[:, np.arange(x0, x0 + w) % P]
        boxes = self._paste(win, None, self._cutline, x0, self.circumference)
        if cut_boxes is not None:
            cut_boxes.extend(boxes)
        return win

    def _render_cutline(self, cx: int, half: float) -> _Patch:
        m = int(math.ceil(4 * self.spec.blur_sigma)) + 4
        x0 = int(math.floor(cx - half)) - m
        w = int(math.ceil(2 * half)) + 2 * m
        off = x0 % self.period
        pix = _to_u8(_clean_float(self.height, w, self.spec, self.seed, off, off + (cx - x0), self.wales, self._ss))
        base = self._tube[:, np.arange(x0, x0 + w) % self.period]
        changed = pix != base
        if changed.ndim == 3:
            changed = changed.any(axis=2)
        changed[:, :m] = False
        changed[:, w - m:] = False
        cols = np.flatnonzero(changed.any(axis=0))
        band = (int(cols[0]), 0, int(cols[-1]) + 1, self.height) if cols.size else (m, 0, w - m, self.height)
        return _Patch(x0=x0 % self.circumference, y0=0, pixels=pix, changed=changed, mask=None, box=band)

    def _positions(self, patch: _Patch, start: int, C: int, W: int) -> list[int]:
        """Frame x positions (left edge) at which ``patch`` shows in a view starting at ``start``."""
        x0b, x1b = patch.box[0], patch.box[2]
        rel = patch.x0 - start
        cands: tuple[int, ...]
        if patch.every_revolution:
            rel %= C
            cands = (rel - C, rel, rel + C)
        else:
            cands = (rel,)
        return [r for r in cands if r + x1b > 0 and r + x0b < W]

    def _paste(self, img: np.ndarray, mask: np.ndarray | None, patch: _Patch, start: int, C: int
               ) -> list[tuple[int, int, int, int]]:
        W = img.shape[1]
        boxes = []
        ph, pw = patch.changed.shape
        for r in self._positions(patch, start, C, W):
            a0, a1 = max(0, r), min(W, r + pw)
            if a1 <= a0:
                continue
            sl = slice(a0 - r, a1 - r)
            ys = slice(patch.y0, patch.y0 + ph)
            ch = patch.changed[:, sl]
            dst = img[ys, a0:a1]
            np.copyto(dst, patch.pixels[:, sl], where=ch[..., None] if dst.ndim == 3 else ch)
            if mask is not None and patch.mask is not None:
                np.maximum(mask[ys, a0:a1], patch.mask[:, sl], out=mask[ys, a0:a1])
            bx0, by0, bx1, by1 = patch.box
            box = (max(0, r + bx0), patch.y0 + by0, min(W, r + bx1), patch.y0 + by1)
            if box[2] > box[0]:
                boxes.append(box)
        return boxes

    # -- defects ---------------------------------------------------------------------------------
    def _make_defect(self, kind: str, frame: int, y: int | None, size: float, intensity: float,
                     every_revolution: bool, ident: int, key: tuple[int, ...]) -> _Patch:
        W, H = self.width, self.height
        ex, ey = defect_extent(kind, self.spec, size)
        half_w = int(math.ceil(ex)) + 8
        pw = 2 * half_w
        target_left = self._start(frame) + W - max(1, int(round(self.speed_px / 2)))
        if y is None:
            yr = np.random.default_rng([self.seed & 0xFFFFFFFF, *key, 0x77])
            my = min(ey, H / 2.0 - 1) if math.isfinite(ey) else 0.0
            y = int(yr.uniform(my, H - my)) if my < H - my else H // 2
        y = int(np.clip(y, 0, H - 1))
        patch = None
        x0 = target_left - 4
        for _ in range(2):  # place it, then shift it so its left edge enters the view at `frame`
            win = self._tube_window(x0, pw)
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, *key])
            pix, mask = add_defect(win, kind, rng, self.spec, center=(half_w, y), size=size, intensity=intensity)
            cols = np.flatnonzero(mask.any(axis=0))
            if cols.size == 0:
                break
            patch = (x0, win, pix, mask, cols)
            if x0 + int(cols[0]) == target_left:
                break
            x0 = target_left - int(cols[0])
        if patch is None:  # degenerate (e.g. zero size): nothing visible
            empty = np.zeros((H, 1), dtype=bool)
            return _Patch(x0=target_left, y0=0, pixels=self._tube[:, :1].copy(), changed=empty,
                          mask=np.zeros((H, 1), np.uint8), kind=kind, ident=ident,
                          every_revolution=every_revolution, first_frame=frame, box=(0, 0, 0, 0))
        x0, win, pix, mask, cols = patch
        changed = pix != win
        if changed.ndim == 3:
            changed = changed.any(axis=2)
        changed |= mask > 0
        rows = np.flatnonzero(mask.any(axis=1))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        # keep only the rows that change, to save memory
        crow = np.flatnonzero(changed.any(axis=1))
        r0, r1 = int(crow[0]), int(crow[-1]) + 1
        return _Patch(x0=x0, y0=r0, pixels=pix[r0:r1].copy(), changed=changed[r0:r1].copy(),
                      mask=mask[r0:r1].copy(), kind=kind, ident=ident, every_revolution=every_revolution,
                      first_frame=frame, box=(box[0], box[1] - r0, box[2], box[3] - r0))

    def _scheduled_patch(self, n: int) -> _Patch:
        if n not in self._sched_patches:
            d = self.scheduled[n]
            self._sched_patches[n] = self._make_defect(d.kind, d.frame, d.y, d.size, d.intensity,
                                                       d.every_revolution, n, (1, n))
        return self._sched_patches[n]

    def _random_patches(self, index: int) -> list[_Patch]:
        if self.random_defect_rate <= 0:
            return []
        found = []
        for f in range(max(0, index - self._lookback), index + 1):
            r = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xA11, f])
            for q in range(int(r.poisson(self.random_defect_rate))):
                key = (f, q)
                if key in self._random_cache:
                    self._random_cache.move_to_end(key)
                else:
                    kind = DEFECT_KINDS[int(r.integers(len(DEFECT_KINDS)))]
                    size = float(r.uniform(0.6, 1.6))
                    inten = float(r.uniform(0.6, 1.2))
                    ident = -(1 + f * 16 + q)
                    self._random_cache[key] = self._make_defect(kind, f, None, size, inten, False, ident,
                                                                (2, f, q))
                    while len(self._random_cache) > 256:
                        self._random_cache.popitem(last=False)
                found.append(self._random_cache[key])
        return found

    # -- lighting --------------------------------------------------------------------------------
    def _illumination(self, index: int) -> np.ndarray:
        d = self.lighting_drift
        ph, per = self._light_params, self._light_periods
        t = float(index)
        gain = 1.0 + d * (0.7 * math.sin(2 * math.pi * t / per[0] + ph[0]) + 0.3 * math.sin(2 * math.pi * t / per[1]
                                                                                              + ph[1]))
        gx = d * 0.8 * math.sin(2 * math.pi * t / per[2] + ph[2])
        gy = d * 0.6 * math.sin(2 * math.pi * t / per[3] + ph[3])
        illum = self._vignette * np.float32(gain)
        illum += np.float32(gx) * self._xs
        illum += np.float32(gy) * self._ys
        return illum

    # -- frames ----------------------------------------------------------------------------------
    def frame(self, index: int) -> tuple[np.ndarray, FrameTruth]:
        """Frame ``index`` (>= 0) and its truth; the same bytes whatever was asked before."""
        if index < 0:
            raise ValueError("frame index must be >= 0")
        W, H, C = self.width, self.height, self.circumference
        start = self._start(index)
        cut_boxes: list[tuple[int, int, int, int]] = []
        img = self._tube_window(start, W, cut_boxes)
        mask = np.zeros((H, W), dtype=np.uint8)
        found = []
        for n, d in enumerate(self.scheduled):
            if d.frame > index:
                continue
            if not d.every_revolution and n not in self._sched_patches:
                reach = 2 * int(math.ceil(defect_extent(d.kind, self.spec, d.size)[0])) + 32
                if self._start(d.frame) + W + reach <= start:  # long gone: no need to paint it
                    continue
            pt = self._scheduled_patch(n)
            if not pt.every_revolution and pt.x0 + pt.changed.shape[1] <= start:
                continue
            found.append(pt)
        found += self._random_patches(index)
        defects = []
        for pt in found:
            boxes = self._paste(img, mask, pt, start, C)
            for b in boxes:
                defects.append({"kind": pt.kind, "box": b, "id": pt.ident, "every_revolution": pt.every_revolution})
        illum = self._illumination(index)
        f = img.astype(np.float32)
        if f.ndim == 3:
            f *= illum[..., None]
        else:
            f *= illum
        if self._noise_pool is not None:
            r = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x4E01, index])
            off = int(r.integers(0, self._noise_pool.size - f.size + 1))
            noise = self._noise_pool[off:off + f.size].reshape(f.shape)
            if r.random() < 0.5:
                f -= noise
            else:
                f += noise
        np.clip(f, 0, 255, out=f)
        out = f.astype(np.uint8)
        cbox = None
        if cut_boxes:
            xs0 = min(b[0] for b in cut_boxes)
            xs1 = max(b[2] for b in cut_boxes)
            cbox = (xs0, 0, xs1, H)
        truth = FrameTruth(index=index, revolution=start // C, cutline_visible=bool(cut_boxes), cutline_box=cbox,
                           defects=defects, mask=mask, offset_px=start % C, circumference_px=C,
                           cutline_px=self.cutline_x)
        return out, truth

    def __iter__(self) -> Iterator[tuple[np.ndarray, FrameTruth]]:
        """Frames 0, 1, 2, ... forever (no pacing: the caller sleeps 1/fps if it wants real time)."""
        i = 0
        while True:
            yield self.frame(i)
            i += 1


def measure_stream_rate(n_frames: int = 50, **stream_kw: object) -> float:
    """Frames per second a :class:`KnitStream` (default: 1280x1024 grayscale) delivers on one core.

    The tube is rendered first (not timed); OpenCV is held to one thread while timing."""
    stream = KnitStream(**stream_kw)  # type: ignore[arg-type]
    stream.frame(0)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        t0 = time.perf_counter()
        for i in range(1, n_frames + 1):
            stream.frame(i)
        dt = time.perf_counter() - t0
    finally:
        cv2.setNumThreads(threads)
    return n_frames / max(dt, 1e-9)
