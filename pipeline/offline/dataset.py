"""Training/test tiles from a folder of fabric images: the seed's preprocessing, made automatic.

:func:`build_dataset` brings every image to a common loop size (scale normalisation by the measured
texture pitch), cuts it into tiles with :func:`knitwatch.pipeline.preprocess.preprocess` - the same
code the live tiler runs - and writes an MVTec-style tile dataset::

    out/train/good/<tile>.png
    out/test/good/<tile>.png
    out/test/<label>/<tile>.png
    out/ground_truth/<label>/<tile>_mask.png
    out/manifest.json
    out/manifest.csv

Tile names are ``<source-stem>_y<y>_x<x>.png`` with ``y, x`` the tile's top-left corner in the
scaled image; when two sources share a stem (MVTec's ``000.png`` in several folders) the stem
becomes ``<split>_<label>_<stem>``.

Input layouts (:func:`discover_images`):

- MVTec: ``root/train/good/*``, ``root/test/<label>/*``, masks ``root/ground_truth/<label>/<stem>_mask.png``;
- folder per label: ``root/<label>/*`` (``good`` -> split train, any other label -> split test);
- flat: ``root/*`` -> label good, split train.

In every layout a mask may also lie beside its image as ``<stem>_mask.png``.

Labels: a tile is labelled with its image's defect label when its mask has at least
``min_defect_px`` defect pixels, otherwise ``good`` (tiles of defective images that show no defect
are normal, as the seed relabelled them). A defective image without a mask keeps its label on every
tile (``defect_px`` null in the manifest). Blank/padding tiles (std < ``min_tile_std``) are skipped.

Manifest (``manifest.json``)::

    {
      "format": "knitwatch-tiles", "version": 1, "created": "<UTC ISO time>", "source": "<src path>",
      "preprocess": {<PreprocessParams fields>, "target_pitch": float | null, "per_image_scale": bool},
      "counts": {"train/good": n, "test/good": n, "test/<label>": n, "skipped_blank": n},
      "images": [{"source", "split", "label", "pitch", "scale", "scaled_shape", "tiles", "skipped_blank"}],
      "tiles":  [{"file", "source", "split", "label", "y", "x", "scale", "pitch", "defect_px"}]
    }

``manifest["preprocess"]`` is :meth:`knitwatch.pipeline.preprocess.PreprocessConfig.to_dict`:
load it with ``PreprocessConfig.from_dict`` (or ``PreprocessParams.from_dict`` after removing the two
scale-policy keys). With ``per_image_scale`` true, each image (and live frame) is resized by
``target_pitch / estimate_pitch(image)`` and ``scale`` holds the median training scale; otherwise
every image is resized by ``scale``. Training copies this dict into the checkpoint unchanged.
``manifest.csv`` holds the ``tiles`` rows. Paths (``file``, ``source``) are POSIX paths relative to
the dataset and the source root.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
from tqdm import tqdm

from knitwatch.pipeline.preprocess import (
    PHOTOMETRIC_MODES,
    PreprocessConfig,
    PreprocessParams,
    estimate_pitch,
    preprocess,
    tile_mask,
)

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"
MANIFEST_FORMAT = "knitwatch-tiles"
MANIFEST_VERSION = 1
OUTLIER_RATIO = 1.5  # per-image scales beyond this factor from 1 are logged as a warning
TILE_FIELDS = ("file", "source", "split", "label", "y", "x", "scale", "pitch", "defect_px")


class DatasetError(Exception):
    """A dataset cannot be read or built; the message names the offending path."""


@dataclass
class SourceImage:
    path: Path
    label: str  # "good" or the defect name
    split: str  # "train" | "test"
    mask_path: Path | None = None


# --------------------------------------------------------------------------------------------
# reading and writing images
# --------------------------------------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 gray (H, W) or BGR (H, W, 3); DatasetError naming the path if it cannot."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise DatasetError(f"unreadable image {path} (not a decodable image file)")
    if img.dtype == np.uint16:
        img = np.rint(img / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DatasetError(f"unsupported pixel type {img.dtype} in {path} (expected 8- or 16-bit)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim not in (2, 3) or img.size == 0:
        raise DatasetError(f"unsupported image shape {img.shape} in {path}")
    return np.ascontiguousarray(img)


def read_mask(path: Path, shape: tuple[int, int], image_path: Path) -> np.ndarray:
    """Read a defect mask as bool (H, W); DatasetError when unreadable or of another size than its image."""
    m = read_image(path)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != tuple(shape):
        raise DatasetError(
            f"mask {path} is {m.shape[1]}x{m.shape[0]} (WxH) but its image {image_path} is "
            f"{shape[1]}x{shape[0]}: a mask must have the size of its image"
        )
    return m > 0


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise DatasetError(f"cannot encode {path}")
    buf.tofile(str(path))


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _is_mask_name(p: Path) -> bool:
    return p.stem.endswith(MASK_SUFFIX)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p) and not _is_mask_name(p))


def _find_mask(img: Path, gt_dirs: list[Path]) -> Path | None:
    names = [img.stem + MASK_SUFFIX + suf for suf in (img.suffix, *IMAGE_SUFFIXES)]
    for d in (*gt_dirs, img.parent):
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover_images(root: Path, *, validate: bool = True) -> list[SourceImage]:
    """Find the images (and masks) under ``root`` in one of the supported layouts (module docstring).

    With ``validate`` every image and mask is decoded once: unreadable files and masks of another
    size than their image raise :class:`DatasetError` naming the file.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a folder")
    gt_root = root / "ground_truth"
    found: list[SourceImage] = []
    if (root / "train").is_dir() or (root / "test").is_dir():
        for split in ("train", "test"):
            sdir = root / split
            if not sdir.is_dir():
                continue
            for img in _images_in(sdir):  # images directly in train/ or test/: normal fabric
                found.append(SourceImage(img, "good", split, _find_mask(img, [])))
            for ldir in _subdirs(sdir):
                for img in _images_in(ldir):
                    mask = _find_mask(img, [gt_root / ldir.name])
                    found.append(SourceImage(img, ldir.name, split, mask))
    else:
        flat = _images_in(root)
        for img in flat:
            found.append(SourceImage(img, "good", "train", _find_mask(img, [])))
        for ldir in _subdirs(root):
            if ldir.name == "ground_truth":
                continue
            split = "train" if ldir.name == "good" else "test"
            for img in _images_in(ldir):
                found.append(SourceImage(img, ldir.name, split, _find_mask(img, [gt_root / ldir.name])))
    if not found:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root} "
            "(expected root/train/good, root/<label>/ or images directly in root)"
        )
    if validate:
        for s in found:
            pixels = read_image(s.path)
            if s.mask_path is not None:
                read_mask(s.mask_path, pixels.shape[:2], s.path)
    return found


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _tile_stems(sources: list[SourceImage]) -> list[str]:
    stems = Counter(s.path.stem for s in sources)
    out = [s.path.stem if stems[s.path.stem] == 1 else f"{s.split}_{s.label}_{s.path.stem}" for s in sources]
    dup = [n for n, c in Counter(out).items() if c > 1]
    if dup:  # same stem, split and label: e.g. a.png and a.jpg in one folder
        out = [f"{n}_{s.path.suffix.lstrip('.').lower()}" if n in dup else n for n, s in zip(out, sources, strict=True)]
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"output {out} already exists and is not empty: choose a new folder or remove it")


def build_dataset(
    src: Path,
    out: Path,
    *,
    tile: int = 256,
    stride: int | None = None,
    target_pitch: float | None = None,
    scale: float | None = None,
    photometric: str = "none",
    min_defect_px: int = 10,
    min_tile_std: float = 2.0,
    grayscale: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build an MVTec-layout tile dataset from ``src`` into ``out``; returns the manifest dict.

    Scale: ``scale`` given -> every image is resized by it (pitch is still measured and recorded
    when possible, never required). Otherwise each image's pitch is measured and it is resized by
    ``target / pitch`` with ``target = target_pitch`` or the median pitch of the train images.
    Everything is written to a temporary folder beside ``out`` and renamed at the end; ``out`` must
    not exist or be empty.
    """
    src, out = Path(src), Path(out)
    stride = tile if stride is None else stride
    if photometric not in PHOTOMETRIC_MODES:
        raise DatasetError(f"photometric must be one of {', '.join(PHOTOMETRIC_MODES)}, got {photometric!r}")
    if scale is not None and (not math.isfinite(scale) or scale <= 0):
        raise DatasetError(f"scale must be a number > 0, got {scale!r}")
    if target_pitch is not None and (not math.isfinite(target_pitch) or target_pitch <= 0):
        raise DatasetError(f"target_pitch must be a number > 0, got {target_pitch!r}")
    if min_defect_px < 1:
        raise DatasetError(f"min_defect_px must be >= 1, got {min_defect_px}")
    try:  # validate the parameters before any work
        base = PreprocessParams(
            scale=1.0 if scale is None else scale,
            tile=tile,
            stride=stride,
            grayscale=grayscale,
            photometric=photometric,
            min_tile_std=min_tile_std,
        )
    except ValueError as e:
        raise DatasetError(str(e)) from e
    _check_out(out)
    sources = discover_images(src)

    # 1. pitch of every image -> per-image scale
    pitches: list[float | None] = []
    for s in tqdm(sources, desc="pitch", unit="img", disable=not progress):
        p = estimate_pitch(read_image(s.path))
        pitches.append(p)
        log.info("pitch", source=_rel(s.path, src), split=s.split, label=s.label, pitch=p)
        if p is None and scale is None:
            raise DatasetError(
                f"no periodic texture found in {s.path}: its loop pitch cannot be measured; "
                "give a fixed scale (--scale) to build without scale normalisation"
            )
    if scale is not None:
        target = None
        scales = [scale] * len(sources)
    else:
        if target_pitch is None:
            train = [p for p, s in zip(pitches, sources, strict=True) if s.split == "train" and p is not None]
            if not train:
                raise DatasetError(f"no train images in {src} to take the target pitch from; give --target-pitch")
            target = float(np.median(train))
        else:
            target = float(target_pitch)
        scales = [target / p for p in pitches]  # type: ignore[operator]  # p is not None here
        for s, p, sc in zip(sources, pitches, scales, strict=True):
            if not 1 / OUTLIER_RATIO <= sc <= OUTLIER_RATIO:
                log.warning(
                    "pitch_far_from_target",
                    source=_rel(s.path, src),
                    pitch=p,
                    target_pitch=target,
                    scale=sc,
                    hint="another fabric, weave side or capture resolution? check this image",
                )
        base = PreprocessParams(**{**base.to_dict(), "scale": float(np.median(scales)), "roi": None})
        log.info("target_pitch", target_pitch=target, source=str(src), images=len(sources))
    config = PreprocessConfig(base, target)

    # 2. tiles, written into a temporary folder beside out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write_tiles(
            src, tmp, sources, pitches, scales, base, config, min_defect_px=min_defect_px, progress=progress
        )
        _check_out(out)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dataset_built", out=str(out), **manifest["counts"])
    return manifest


def _write_tiles(
    src: Path,
    tmp: Path,
    sources: list[SourceImage],
    pitches: list[float | None],
    scales: list[float],
    base: PreprocessParams,
    config: PreprocessConfig,
    *,
    min_defect_px: int,
    progress: bool,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    made: set[Path] = set()

    def folder(*parts: str) -> Path:
        d = tmp.joinpath(*parts)
        if d not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(d)
        return d

    stems = _tile_stems(sources)
    it = zip(sources, pitches, scales, stems, strict=True)
    for s, pitch, sc, stem in tqdm(it, total=len(sources), desc="tiles", unit="img", disable=not progress):
        img = read_image(s.path)
        params = PreprocessParams(**{**base.to_dict(), "scale": sc, "roi": None})
        tiles, grid = preprocess(img, params)
        masks = None
        if s.mask_path is not None:
            masks = tile_mask(read_mask(s.mask_path, img.shape[:2], s.path).astype(np.uint8), grid)
        n_ok = 0
        for i in range(len(grid)):
            if not grid.valid[i]:
                counts["skipped_blank"] += 1
                continue
            y, x = (int(v) for v in grid.coords[i])
            name = f"{stem}_y{y}_x{x}"
            defect_px: int | None = None
            label = s.label
            if masks is not None:
                defect_px = int(np.count_nonzero(masks[i]))
                if defect_px < min_defect_px:
                    label = "good"
            elif s.label != "good":
                log.debug("no_mask", source=_rel(s.path, src), label=s.label)
            split = s.split
            rel = Path(split) / label / f"{name}.png"
            _write_png(folder(split, label) / f"{name}.png", tiles[i])
            if label != "good" and masks is not None:
                _write_png(folder("ground_truth", label) / f"{name}_mask.png", masks[i])
            counts[f"{split}/{label}"] += 1
            n_ok += 1
            rows.append(
                {
                    "file": rel.as_posix(),
                    "source": _rel(s.path, src),
                    "split": split,
                    "label": label,
                    "y": y,
                    "x": x,
                    "scale": sc,
                    "pitch": pitch,
                    "defect_px": defect_px,
                }
            )
        if s.label != "good" and s.mask_path is None:
            log.warning("defect_image_without_mask", source=_rel(s.path, src), label=s.label, tiles=n_ok)
        images.append(
            {
                "source": _rel(s.path, src),
                "split": s.split,
                "label": s.label,
                "pitch": pitch,
                "scale": sc,
                "scaled_shape": list(grid.scaled_shape),
                "tiles": n_ok,
                "skipped_blank": int((~grid.valid).sum()),
            }
        )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(src),
        "preprocess": config.to_dict(),
        "counts": dict(sorted(counts.items())),
        "images": images,
        "tiles": rows,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    with (tmp / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(TILE_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in TILE_FIELDS})
    return manifest


def load_manifest(root: Path) -> dict[str, Any]:
    """Read ``root/manifest.json`` of a built dataset (DatasetError when missing or not one)."""
    path = Path(root) / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read dataset manifest {path}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path} is not a knitwatch tile dataset manifest")
    return m
