"""The one preprocessing path: camera frame or training image -> model tiles, and maps back.

The live tiler and the dataset builder both call :func:`preprocess` with a :class:`PreprocessParams`;
the parameters travel from the dataset manifest into the model checkpoint and from there to the
tiler, so training tiles and live tiles are cut by the same code with the same numbers.

Steps of :func:`preprocess` (in this order):

1. **ROI crop** ``frame[y0:y1, x0:x1]`` (``roi`` is in original frame pixels; ``None`` = whole frame).
2. **Colour** - ``grayscale=True`` converts a BGR frame to gray (OpenCV convention); with
   ``grayscale=False`` a gray frame is replicated to three channels, so tiles always have the same
   shape for one set of parameters.
3. **Photometric** - ``"none"`` or ``"standardize"``: a per-frame gain and offset that bring the
   mean/std of the textured (non-flat) pixels to ``target_mean``/``target_std``. Flat areas
   (padding, saturated glare) are excluded from the statistics.
4. **Scale** - resize by ``scale`` (``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when
   enlarging). The scaled size is ``round(roi_h * scale), round(roi_w * scale)``, except that a side
   overshooting the tile grid by at most 1% is snapped onto it (see :func:`scaled_size`).
5. **Tiles** - ``tile`` x ``tile`` at ``stride``; the last tile of a row/column is aligned to the
   right/bottom edge instead of being dropped, so the tiles cover the whole scaled image. An image
   smaller than one tile is padded on the bottom/right by reflection; the padding is recorded
   (``scaled_shape`` < tile) and :func:`stitch` crops it away. Tiles whose standard deviation is
   below ``min_tile_std`` are marked invalid (blank padding, no fabric): the dataset builder skips
   them, the live path still scores them.

Scale normalisation ("every fabric at the same loop size"): :func:`estimate_pitch` measures the
dominant horizontal period of the texture (the wale spacing of a knit, the thread spacing of a
weave). With a ``target_pitch`` the scale of an image is ``target_pitch / estimate_pitch(image)``.
:class:`PreprocessConfig` bundles the parameters with the target pitch; its flat dict form
(``PreprocessParams`` fields + ``target_pitch`` + ``per_image_scale``) is what the dataset
manifest stores under ``"preprocess"`` and what a checkpoint should copy. :class:`Preprocessor`
is the live side: it applies a config to frames, estimating (and smoothing) the scale per frame
when ``target_pitch`` is set.

:func:`stitch` maps per-tile outputs (anomaly maps, possibly at a lower resolution than the tile)
back to the original frame: tiles are resized to the tile size, overlaps are averaged, the
scaled image is resized back to the ROI size and placed into a frame-sized map; **pixels outside
the ROI are 0**. For ``scale == 1`` the round trip ``stitch(tiles.astype(float32), grid)`` returns
the image exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import structlog

log = structlog.get_logger(__name__)

PHOTOMETRIC_MODES = ("none", "standardize")

# Pitch search range (pixels) and the acceptance thresholds of estimate_pitch.
PITCH_MIN = 2.5
PITCH_MAX = 64.0
_SEGMENT = 256  # row segments of this length are analysed (Welch-style averaging)
_MAX_SEGMENTS = 4096  # rows are subsampled above this many segments (speed on big frames)
_MIN_PROMINENCE = 6.0  # the fundamental's line must stand this far above the band's median power
# a line at 1/k of the strongest line's frequency, with at least this share of its power, is the
# fundamental (stricter for larger k: aliased harmonics of sharp textures leave weak spurious lines)
_SUBHARMONIC_MIN = {2: 0.08, 3: 0.12, 4: 0.16}
_MIN_SEGMENTS = 4
_MIN_LOCAL = 3.0  # a spectral line must stand this far above its own neighbourhood
_FLAT_STD = 1.0  # local (7x7) std below this = flat (padding, saturation): excluded from analysis


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


@dataclass(frozen=True)
class PreprocessParams:
    """Parameters of :func:`preprocess`; recorded in the dataset manifest and the checkpoint."""

    scale: float = 1.0  # resize factor applied to the (ROI-cropped) frame before tiling
    tile: int = 256
    stride: int = 256
    roi: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in original frame pixels
    grayscale: bool = True
    photometric: str = "none"  # "none" | "standardize"
    target_mean: float = 128.0
    target_std: float = 40.0
    min_tile_std: float = 2.0  # tiles below this std are blank/padding: flagged invalid

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"preprocess parameter {name!r}: {why} (got {getattr(self, name)!r})")

        if not _is_number(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise bad("scale", "must be a finite number > 0")
        if not _is_int(self.tile) or self.tile < 1:
            raise bad("tile", "must be an integer >= 1")
        if not _is_int(self.stride) or not 1 <= self.stride <= self.tile:
            raise bad("stride", f"must be an integer in 1..tile ({self.tile}) so that tiles cover the image")
        if self.roi is not None:
            roi = self.roi
            if (
                not isinstance(roi, tuple | list)
                or len(roi) != 4
                or not all(_is_int(v) for v in roi)
                or roi[0] < 0
                or roi[1] < 0
                or roi[2] <= roi[0]
                or roi[3] <= roi[1]
            ):
                raise bad("roi", "must be None or 4 integers x0, y0, x1, y1 with 0 <= x0 < x1 and 0 <= y0 < y1")
            object.__setattr__(self, "roi", tuple(int(v) for v in roi))
        if not isinstance(self.grayscale, bool | np.bool_):
            raise bad("grayscale", "must be true or false")
        if self.photometric not in PHOTOMETRIC_MODES:
            raise bad("photometric", f"must be one of {', '.join(PHOTOMETRIC_MODES)}")
        if not _is_number(self.target_mean) or not 0 <= self.target_mean <= 255:
            raise bad("target_mean", "must be a number in 0..255")
        if not _is_number(self.target_std) or not 0 < self.target_std <= 255:
            raise bad("target_std", "must be a number in (0, 255]")
        if not _is_number(self.min_tile_std) or not 0 <= self.min_tile_std < 255:
            raise bad("min_tile_std", "must be a number >= 0")
        # normalise numeric types (numpy scalars -> plain Python) so to_dict is JSON-ready
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "stride", int(self.stride))
        object.__setattr__(self, "grayscale", bool(self.grayscale))
        for name in ("target_mean", "target_std", "min_tile_std"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of all fields (``roi`` as a list or None)."""
        d = dataclasses.asdict(self)
        d["roi"] = list(self.roi) if self.roi is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessParams:
        """Build from :meth:`to_dict` output. Unknown keys raise ValueError naming them; missing keys
        take the defaults; every value is validated (ValueError naming the field)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess parameters must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown preprocess parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}"
            )
        kw = dict(d)
        if isinstance(kw.get("roi"), list):
            kw["roi"] = tuple(kw["roi"])
        return cls(**kw)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything a model needs to cut its input: the fixed parameters plus the scale policy.

    ``target_pitch is None``: every frame is resized by ``params.scale``.
    ``target_pitch`` set: a frame's scale is ``target_pitch / estimate_pitch(roi crop)``;
    ``params.scale`` then holds the typical (median training) scale, used until a frame's pitch has
    been measured.

    Flat dict form (what the dataset manifest stores as ``"preprocess"`` and a checkpoint copies)::

        {**PreprocessParams.to_dict(), "target_pitch": float | None, "per_image_scale": bool}

    ``per_image_scale`` is redundant (``target_pitch is not None``) and checked on load.
    """

    params: PreprocessParams = PreprocessParams()
    target_pitch: float | None = None

    def __post_init__(self) -> None:
        tp = self.target_pitch
        if tp is not None:
            if not _is_number(tp) or not math.isfinite(tp) or tp <= 0:
                raise ValueError(f"preprocess parameter 'target_pitch': must be None or a pitch in px > 0, got {tp!r}")
            object.__setattr__(self, "target_pitch", float(tp))

    @property
    def per_image_scale(self) -> bool:
        return self.target_pitch is not None

    def to_dict(self) -> dict[str, Any]:
        return {**self.params.to_dict(), "target_pitch": self.target_pitch, "per_image_scale": self.per_image_scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        if not isinstance(d, dict):
            raise ValueError(f"preprocess config must be a dict, got {type(d).__name__}")
        rest = dict(d)
        target_pitch = rest.pop("target_pitch", None)
        per_image = rest.pop("per_image_scale", None)
        cfg = cls(PreprocessParams.from_dict(rest), target_pitch)
        if per_image is not None and bool(per_image) != cfg.per_image_scale:
            raise ValueError(
                f"preprocess parameter 'per_image_scale': {per_image!r} contradicts target_pitch={target_pitch!r}"
            )
        return cfg

    def scale_for(self, pitch: float | None) -> float:
        """The scale for an image of the given measured pitch (``params.scale`` when fixed or unknown)."""
        if self.target_pitch is None or pitch is None:
            return self.params.scale
        return self.target_pitch / pitch


# --------------------------------------------------------------------------------------------
# pitch estimation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PitchEstimate:
    pitch: float  # period in pixels
    axis: Literal["x", "y"]  # "x": horizontal period (wale spacing); "y": vertical fallback
    correlation: float  # normalised (band-limited) autocorrelation at the period, 1 = perfectly periodic
    prominence: float  # power of the fundamental's spectral line / median power over the searched band


def _to_gray_f32(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] != 3:
            raise ValueError(f"expected a gray (H, W) or colour (H, W, 3) image, got shape {img.shape}")
        if img.dtype != np.uint8:
            img = img.astype(np.float32)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim != 2:
        raise ValueError(f"expected a gray (H, W) or colour (H, W, 3) image, got shape {img.shape}")
    return img.astype(np.float32, copy=False)


def flat_mask(gray: np.ndarray, ksize: int = 7, min_std: float = _FLAT_STD) -> np.ndarray:
    """True where the local (ksize x ksize) standard deviation is below ``min_std``: blank padding,
    saturated or dead areas that carry no texture."""
    g = gray.astype(np.float32, copy=False)
    m = cv2.blur(g, (ksize, ksize), borderType=cv2.BORDER_REFLECT)
    m2 = cv2.blur(g * g, (ksize, ksize), borderType=cv2.BORDER_REFLECT)
    return (m2 - m * m) < min_std * min_std


def _segments(gray: np.ndarray, flat: np.ndarray, seg: int) -> np.ndarray:
    """Row segments of length ``seg`` (non-overlapping, last one right-aligned) free of flat pixels."""
    h, w = gray.shape
    starts = list(range(0, w - seg + 1, seg))
    if starts[-1] + seg < w:
        starts.append(w - seg)
    rows = np.arange(h)
    n = h * len(starts)
    if n > _MAX_SEGMENTS:
        rows = rows[:: int(math.ceil(n / _MAX_SEGMENTS))]
    out = []
    for s in starts:
        block = gray[rows, s : s + seg]
        ok = flat[rows, s : s + seg].mean(axis=1) <= 0.02
        if ok.any():
            out.append(block[ok])
    if not out:
        return np.empty((0, seg), np.float32)
    return np.concatenate(out, axis=0)


def _parabola(y0: float, y1: float, y2: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through three equally spaced samples."""
    denom = y0 - 2.0 * y1 + y2
    if denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (y0 - y2) / denom, -0.5, 0.5))


def _spectrum(x: np.ndarray, seg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Averaged power spectrum of detrended, Hann-tapered segments (zero-padded 4x) and the taper."""
    t = np.linspace(-1.0, 1.0, seg)
    x = x - x.mean(axis=1, keepdims=True)
    x = x - np.outer((x @ t) / (t @ t), t)  # linear illumination trend
    win = np.hanning(seg + 2)[1:-1]
    nfft = 1 << int(math.ceil(math.log2(4 * seg)))
    spec = np.fft.rfft(x * win, n=nfft, axis=1)
    power = (spec.real**2 + spec.imag**2).mean(axis=0)
    return power, np.fft.rfftfreq(nfft), win


def _peak(power: np.ndarray, freqs: np.ndarray, f: float, tol: float, pad: float) -> tuple[float, float, float] | None:
    """The local maximum of ``power`` within ``f * (1 +- tol)`` (at least +-1.5 bins):
    (frequency refined to sub-bin by a parabola through the log-power, power, local prominence).

    The local prominence is the peak over the median of its neighbourhood (+-6 unpadded bins, the
    window's main lobe of +-2.5 bins left out): a line of a periodic texture is as narrow as the
    window allows, a bump of a red (1/f-like) background is not.
    """
    df = float(freqs[1] - freqs[0])
    k = np.nonzero(np.abs(freqs - f) <= max(tol * f, 1.5 * df))[0]
    k = k[(k > 0) & (k < power.size - 1)]
    if k.size == 0:
        return None
    i = int(k[np.argmax(power[k])])
    p0, p1, p2 = power[i - 1], power[i], power[i + 1]
    if not (p1 > 0 and p1 >= p0 and p1 >= p2):
        return None  # no peak here: a slope running into a stronger one nearby
    off = _parabola(*np.log(np.maximum([p0, p1, p2], p1 * 1e-12))) if min(p0, p2) > 0 else 0.0
    j = np.arange(max(1, i - int(6 * pad)), min(power.size, i + int(6 * pad) + 1))
    j = j[np.abs(j - i) > 2.5 * pad]
    around = float(np.median(power[j])) if j.size else 0.0
    local = float(p1) / around if around > 0 else math.inf
    return (i + off) * df, float(p1), local


def _axis_pitch(gray: np.ndarray, flat: np.ndarray, pmin: float, pmax: float) -> PitchEstimate | None:
    """Horizontal period of ``gray`` from the averaged power spectrum of its rows.

    The strongest spectral line in the band 1/pmax..1/pmin is found; if a clear line sits at 1/2, 1/3
    or 1/4 of its frequency, that one is the fundamental (textures whose half-period detail dominates,
    e.g. the two legs of a knit loop) and the period is k / (frequency of the strongest line).
    """
    h, w = gray.shape
    seg = min(w, _SEGMENT)
    pmax = min(pmax, seg / 3.0)
    if seg < 8 or pmax <= pmin:
        return None
    x = _segments(gray, flat, seg).astype(np.float64)
    if x.shape[0] < _MIN_SEGMENTS:
        return None
    power, freqs, win = _spectrum(x, seg)
    fmin, fmax = 1.0 / pmax, 1.0 / pmin
    inband = (freqs >= fmin) & (freqs <= fmax)
    bg = float(np.median(power[inband])) if inband.any() else 0.0
    if bg <= 0 or not inband.any():
        return None
    band_idx = np.nonzero(inband)[0]
    pad = (freqs.size - 1) * 2 / seg  # zero-padding factor of the spectrum
    star = _peak(power, freqs, float(freqs[band_idx[np.argmax(power[band_idx])]]), 0.0, pad)
    if star is None or star[2] < _MIN_LOCAL:
        return None
    f_star, p_star, _ = star
    k_best, fund = 1, star
    for k in (4, 3, 2):
        fc = f_star / k
        if fc < fmin:
            continue
        sub = _peak(power, freqs, fc, 0.04, pad)
        if (
            sub is not None
            and sub[1] >= _SUBHARMONIC_MIN[k] * p_star
            and sub[1] >= _MIN_PROMINENCE * bg
            and sub[2] >= _MIN_LOCAL
        ):
            k_best, fund = k, sub
            break
    pitch = k_best / f_star  # the strongest line gives the best-resolved frequency
    if not (pmin <= pitch <= pmax):
        return None
    prominence = fund[1] / bg
    # normalised autocorrelation at the period (band-limited: shading and aliasing removed)
    keep = np.where((freqs >= 1.0 / (1.5 * pmax)) & (freqs <= fmax), power, 0.0)
    wpow = np.abs(np.fft.rfft(win, n=2 * (power.size - 1))) ** 2
    n = np.arange(power.size)
    phase = np.cos(2 * np.pi * n * pitch / (2 * (power.size - 1)))
    wt = np.where(n == 0, 1.0, 2.0)
    r_acf = float((wt * keep * phase).sum() / max((wt * keep).sum(), 1e-300))
    r_win = float((wt * wpow * phase).sum() / (wt * wpow).sum())
    corr = r_acf / r_win if r_win > 0.05 else r_acf
    return PitchEstimate(pitch=float(pitch), axis="x", correlation=float(corr), prominence=float(prominence))


def _clear(e: PitchEstimate | None) -> bool:
    return e is not None and e.prominence >= _MIN_PROMINENCE


def measure_pitch(
    image: np.ndarray, *, pmin: float = PITCH_MIN, pmax: float = PITCH_MAX, vertical_fallback: bool = True
) -> PitchEstimate | None:
    """Measure the texture period with its evidence; None when there is no clear periodic texture.

    The horizontal period is tried first (the wale spacing of a knit; for a weave the warp spacing).
    Only when the rows show no clear period and ``vertical_fallback`` is set, the column period is
    returned (``axis="y"``), e.g. a fabric of horizontal ribs.
    """
    gray = _to_gray_f32(image)
    if gray.size == 0:
        return None
    flat = flat_mask(gray)
    est = _axis_pitch(gray, flat, pmin, pmax)
    if _clear(est):
        return est
    if vertical_fallback:
        v = _axis_pitch(np.ascontiguousarray(gray.T), np.ascontiguousarray(flat.T), pmin, pmax)
        if _clear(v):
            assert v is not None
            return dataclasses.replace(v, axis="y")
    return None


def estimate_pitch(image: np.ndarray) -> float | None:
    """Loop pitch in pixels: the dominant horizontal period of the fabric texture (wale spacing).

    Rows are cut into 256-px segments (segments touching flat padding or saturated areas are left
    out), detrended, Hann-tapered and their power spectra averaged (Welch). The strongest spectral
    line between periods 2.5 and 64 px is taken; when a clear line sits at 1/2, 1/3 or 1/4 of its
    frequency, that is the fundamental (e.g. the two legs of a knit loop make the half period the
    strongest line) and the period is k / (frequency of the strongest line), refined to sub-bin by a
    parabola through the log-power. Returns None when no line stands clearly above the spectrum's
    background, both over the band (x6) and locally (x3) - flat images, noise, smooth shading.
    Falls back to the vertical period when only that one is clear. Scales with the image: resizing
    by ``f`` multiplies it by ``f``. Note that the result is the texture's *repeat*: for a texture
    whose pattern repeats every two wales (pique) it is two wale spacings - consistently so, which
    is what scale normalisation needs. About 5-10 ms for a 256x512 image, ~0.1 s for 2048x2400.
    """
    est = measure_pitch(image)
    return None if est is None else est.pitch


# --------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------


@dataclass
class TileGrid:
    """Geometry of one preprocessed frame: where each tile came from."""

    frame_shape: tuple[int, int]  # original frame H, W
    roi: tuple[int, int, int, int]  # effective roi (x0, y0, x1, y1) in original pixels
    scaled_shape: tuple[int, int]  # H, W of the ROI after scaling (before any padding)
    tile: int
    coords: np.ndarray  # (N, 2) int (y, x) top-left of each tile in scaled coordinates
    valid: np.ndarray  # (N,) bool, False for blank/padding tiles (std < min_tile_std)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape of the tiled canvas: ``scaled_shape`` grown to at least one tile (reflect padding)."""
        return max(self.scaled_shape[0], self.tile), max(self.scaled_shape[1], self.tile)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for message headers)."""
        return {
            "frame_shape": list(self.frame_shape),
            "roi": list(self.roi),
            "scaled_shape": list(self.scaled_shape),
            "tile": self.tile,
            "coords": self.coords.tolist(),
            "valid": self.valid.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileGrid:
        return cls(
            frame_shape=(int(d["frame_shape"][0]), int(d["frame_shape"][1])),
            roi=tuple(int(v) for v in d["roi"]),  # type: ignore[arg-type]
            scaled_shape=(int(d["scaled_shape"][0]), int(d["scaled_shape"][1])),
            tile=int(d["tile"]),
            coords=np.asarray(d["coords"], dtype=np.int64).reshape(-1, 2),
            valid=np.asarray(d["valid"], dtype=bool).reshape(-1),
        )


def tile_positions(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last one aligned to the far edge."""
    if length <= tile:
        return [0]
    pos = list(range(0, length - tile + 1, stride))
    if pos[-1] + tile < length:
        pos.append(length - tile)
    return pos


def _check_frame(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    if f.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {f.dtype}")
    if f.ndim == 3 and f.shape[2] == 1:
        f = f[:, :, 0]
    if f.ndim == 3 and f.shape[2] == 4:
        f = f[:, :, :3]
    if not (f.ndim == 2 or (f.ndim == 3 and f.shape[2] == 3)):
        raise ValueError(f"frame must be (H, W) or (H, W, 3), got shape {f.shape}")
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"empty frame, shape {f.shape}")
    return f


def _effective_roi(frame_shape: tuple[int, int], roi: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    h, w = frame_shape
    if roi is None:
        return 0, 0, w, h
    x0, y0, x1, y1 = roi
    if x1 > w or y1 > h:
        raise ValueError(f"roi {roi} (x0, y0, x1, y1) extends outside the frame of {w}x{h} (WxH)")
    return x0, y0, x1, y1


def _snap(n: int, tile: int, stride: int) -> int:
    """Shrink ``n`` by at most 1% when that saves a whole extra row/column of tiles."""
    if n <= tile:
        return n
    covered = tile + ((n - tile) // stride) * stride  # longest length the stride grid covers exactly
    return covered if 0 < n - covered <= max(1, int(0.01 * n)) else n


def scaled_size(
    height: int, width: int, scale: float, tile: int | None = None, stride: int | None = None
) -> tuple[int, int]:
    """(H, W) after resizing by ``scale``: rounded, at least 1.

    With ``tile``/``stride`` and ``scale != 1``, a side that would overshoot the tile grid by at most
    1% of its length is shrunk onto the grid: an image scaled by 1.004 to 257 px would otherwise need
    a second, almost identical row of 256-px tiles. (The aspect ratio changes by at most 1%, well
    inside the pitch estimate's own uncertainty; ``scale == 1`` is never touched.)
    """
    h, w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    if tile is not None and scale != 1.0:
        st = tile if stride is None else stride
        h, w = _snap(h, tile, st), _snap(w, tile, st)
    return h, w


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == tuple(shape):
        return img
    shrinking = shape[0] * shape[1] < h * w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (int(shape[1]), int(shape[0])), interpolation=interp)


def _photometric(img: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Per-frame standardisation to target_mean/target_std over textured pixels; float32 output."""
    f = img.astype(np.float32)
    gray = f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
    keep = ~flat_mask(gray)
    vals = f[keep] if keep.any() else f.reshape(-1, *f.shape[2:])
    mean = float(vals.mean())
    std = float(vals.std())
    if std < 1e-3:
        return f  # nothing to standardise (blank frame): leave as is
    return (f - mean) * (params.target_std / std) + params.target_mean


def _pad_to(img: np.ndarray, tile: int) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph == 0 and pw == 0:
        return img
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    mode: Literal["reflect", "edge"] = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(img, pad, mode=mode)


def preprocess(frame: np.ndarray, params: PreprocessParams) -> tuple[np.ndarray, TileGrid]:
    """Frame (uint8, (H, W) or (H, W, 3) BGR) -> tiles and their grid.

    Tiles are uint8 and C-contiguous: (N, tile, tile) when ``params.grayscale`` else
    (N, tile, tile, 3). Tiles are in row-major order of their (y, x) positions.
    """
    f = _check_frame(frame)
    frame_shape = (int(f.shape[0]), int(f.shape[1]))
    roi = _effective_roi(frame_shape, params.roi)
    x0, y0, x1, y1 = roi
    img = f[y0:y1, x0:x1]
    if params.grayscale and img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)
    elif not params.grayscale and img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    target = scaled_size(y1 - y0, x1 - x0, params.scale, params.tile, params.stride)
    if params.photometric == "standardize":
        work = _resize(_photometric(img, params), target)
        img = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    else:
        img = _resize(np.ascontiguousarray(img), target)
    canvas = _pad_to(img, params.tile)
    t = params.tile
    ys = tile_positions(img.shape[0], t, params.stride)
    xs = tile_positions(img.shape[1], t, params.stride)
    coords = np.array([(y, x) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)
    tiles = np.empty((len(coords), t, t, *canvas.shape[2:]), dtype=np.uint8)
    for i, (y, x) in enumerate(coords):
        tiles[i] = canvas[y : y + t, x : x + t]
    flat = tiles.reshape(len(coords), -1).astype(np.float32)
    valid = flat.std(axis=1) >= params.min_tile_std
    grid = TileGrid(
        frame_shape=frame_shape,
        roi=roi,
        scaled_shape=(int(img.shape[0]), int(img.shape[1])),
        tile=t,
        coords=coords,
        valid=valid,
    )
    return tiles, grid


def stitch(tile_maps: np.ndarray, grid: TileGrid, *, out_shape: str = "frame") -> np.ndarray:
    """Per-tile maps (N, h, w) -> one float32 map; overlapping tiles are averaged.

    Each map is resized to the tile size first (model maps are often coarser than the tile).
    ``out_shape``: ``"frame"`` (default) the original frame (H, W) with 0 outside the ROI;
    ``"roi"`` the ROI crop in original pixels; ``"scaled"`` the scaled ROI (the tiles' coordinates).
    Invalid (blank) tiles contribute like the others.
    """
    maps = np.asarray(tile_maps)
    if maps.ndim != 3 or maps.shape[0] != len(grid):
        raise ValueError(f"tile_maps must be (N={len(grid)}, h, w), got shape {maps.shape}")
    if out_shape not in ("frame", "roi", "scaled"):
        raise ValueError(f"out_shape must be 'frame', 'roi' or 'scaled', got {out_shape!r}")
    t = grid.tile
    ph, pw = grid.padded_shape
    acc = np.zeros((ph, pw), np.float64)
    cnt = np.zeros((ph, pw), np.float64)
    for m, (y, x) in zip(maps, grid.coords, strict=True):
        m32: np.ndarray = np.asarray(m, dtype=np.float32)
        if m32.shape != (t, t):
            m32 = cv2.resize(m32, (t, t), interpolation=cv2.INTER_LINEAR)
        acc[y : y + t, x : x + t] += m32
        cnt[y : y + t, x : x + t] += 1.0
    sh, sw = grid.scaled_shape
    acc, cnt = acc[:sh, :sw], cnt[:sh, :sw]
    scaled = np.divide(acc, cnt, out=np.zeros_like(acc), where=cnt > 0).astype(np.float32)
    if out_shape == "scaled":
        return scaled
    x0, y0, x1, y1 = grid.roi
    roi_map = _resize(scaled, (y1 - y0, x1 - x0))
    if out_shape == "roi":
        return np.ascontiguousarray(roi_map, dtype=np.float32)
    full = np.zeros(grid.frame_shape, np.float32)
    full[y0:y1, x0:x1] = roi_map
    return full


def tile_mask(mask: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Cut a frame-sized mask with the grid's geometry -> (N, tile, tile) uint8 in {0, 255}.

    Nearest-neighbour resize; padding (image smaller than a tile) is reflected like the image, so a
    mask tile shows the defect pixels the image tile shows.
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if tuple(m.shape) != tuple(grid.frame_shape):
        raise ValueError(f"mask shape {m.shape} differs from the frame shape {grid.frame_shape}")
    x0, y0, x1, y1 = grid.roi
    m = np.where(m[y0:y1, x0:x1] > 0, 255, 0).astype(np.uint8)
    if m.shape != tuple(grid.scaled_shape):
        m = cv2.resize(m, (grid.scaled_shape[1], grid.scaled_shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    canvas = _pad_to(m, grid.tile)
    t = grid.tile
    out = np.empty((len(grid), t, t), np.uint8)
    for i, (y, x) in enumerate(grid.coords):
        out[i] = canvas[y : y + t, x : x + t]
    return out


# --------------------------------------------------------------------------------------------
# live side
# --------------------------------------------------------------------------------------------


class Preprocessor:
    """Applies a :class:`PreprocessConfig` to a stream of frames (the live tiler's half).

    With a ``target_pitch`` the pitch is measured on the ROI crop every ``every`` frames, the median
    of the last ``window`` measurements sets the scale, and frames whose pitch cannot be measured
    keep the previous scale (``params.scale`` before the first measurement).
    """

    def __init__(self, config: PreprocessConfig, *, every: int = 1, window: int = 5) -> None:
        if every < 1 or window < 1:
            raise ValueError("every and window must be >= 1")
        self.config = config
        self.every = every
        self._pitches: deque[float] = deque(maxlen=window)
        self._n = 0
        self.scale = config.params.scale

    @classmethod
    def from_dict(cls, d: dict[str, Any], **kw: Any) -> Preprocessor:
        return cls(PreprocessConfig.from_dict(d), **kw)

    @property
    def pitch(self) -> float | None:
        """Smoothed measured pitch (None before the first successful measurement)."""
        return float(np.median(self._pitches)) if self._pitches else None

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, TileGrid]:
        cfg = self.config
        if cfg.target_pitch is not None and self._n % self.every == 0:
            f = _check_frame(frame)
            x0, y0, x1, y1 = _effective_roi((f.shape[0], f.shape[1]), cfg.params.roi)
            p = estimate_pitch(f[y0:y1, x0:x1])
            if p is not None:
                self._pitches.append(p)
                self.scale = cfg.scale_for(self.pitch)
            else:
                log.debug("pitch_not_measured", frame=self._n, scale=self.scale)
        self._n += 1
        params = cfg.params if self.scale == cfg.params.scale else dataclasses.replace(cfg.params, scale=self.scale)
        return preprocess(frame, params)
