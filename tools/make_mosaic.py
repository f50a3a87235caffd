"""Write docs/mosaic.png: what the knitted-fabric simulator draws, at a glance.

A 4x4 grid of 136x136 pictures, each labelled: normal fabric (both textures, several pitches,
lighting levels and a dyed colour), cutlines, a frame of the turning tube, and each defect kind
(a red box around its mask). 136 px tiles keep the PNG of noisy fabric under 400 KB.
Run from the repository root:

    .venv/bin/python tools/make_mosaic.py [--out docs/mosaic.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from knitwatch.pipeline.sources.knitsim import (
    DEFECT_KINDS,
    FabricSpec,
    KnitStream,
    ScheduledDefect,
    render_fabric,
    render_sample,
)

TILE = 136


def _bgr(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = _bgr(img).copy()
    cv2.rectangle(out, (0, TILE - 15), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(out, text, (3, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _box(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A red box a few pixels outside the defect's mask, as in the reference figures."""
    out = _bgr(img).copy()
    ys, xs = np.nonzero(mask)
    if xs.size:
        cv2.rectangle(out, (max(0, int(xs.min()) - 4), max(0, int(ys.min()) - 4)),
                      (min(TILE - 1, int(xs.max()) + 4), min(TILE - 16, int(ys.max()) + 4)), (0, 0, 255), 1)
    return out


def build_mosaic() -> np.ndarray:
    """The 4x4 mosaic as a BGR uint8 image."""
    tiles: list[np.ndarray] = []
    normals = [
        ("jersey p6 gray128", FabricSpec(), 1),
        ("jersey p4 gray45", FabricSpec(pitch_px=4, brightness=45), 2),
        ("jersey p10 gray170", FabricSpec(pitch_px=10, brightness=170), 3),
        ("pique p6 gray185", FabricSpec(texture="pique", brightness=185), 4),
        ("pique p4 gray60", FabricSpec(texture="pique", pitch_px=4, brightness=60), 5),
        ("jersey p7 colour", FabricSpec(pitch_px=7, color=True, brightness=110), 6),
    ]
    for text, spec, seed in normals:
        tiles.append(_label(render_fabric(TILE, TILE, spec, seed), text))
    tiles.append(_label(render_fabric(TILE, TILE, FabricSpec(pitch_px=5, brightness=100), 7, cutline_x=90),
                        "cutline (normal) jersey"))
    tiles.append(_label(render_fabric(TILE, TILE, FabricSpec(texture="pique", brightness=175), 8, cutline_x=60),
                        "cutline (normal) pique"))
    specs = {
        "hole": FabricSpec(brightness=90),
        "ladder": FabricSpec(pitch_px=5, brightness=110),
        "needle_line": FabricSpec(pitch_px=5, brightness=120),
        "tension_stripe": FabricSpec(texture="pique", brightness=170),
        "oil_stain": FabricSpec(pitch_px=7, color=True, brightness=120),
        "slub": FabricSpec(brightness=95),
        "fly": FabricSpec(texture="pique", brightness=180),
    }
    for i, kind in enumerate(DEFECT_KINDS):
        img, mask = render_sample(TILE, TILE, specs[kind], 20 + i, defect=kind, center=(TILE // 2 - 10, TILE // 2),
                                  size=1.3)
        tiles.append(_label(_box(img, mask), kind))
    stream = KnitStream(320, TILE, FabricSpec(pitch_px=5, brightness=80), seed=9, speed_px=40, revolution_frames=30,
                        defects=[ScheduledDefect("needle_line", 0, every_revolution=True, intensity=0.7)])
    best = None
    for i in range(30):  # the frame where the cutline is nearest the middle
        frame, truth = stream.frame(i)
        if truth.cutline_visible:
            mid = (truth.cutline_box[0] + truth.cutline_box[2]) / 2
            if best is None or abs(mid - 160) < best[0]:
                best = (abs(mid - 160), frame, mid)
    assert best is not None
    x0 = int(np.clip(best[2] - TILE / 2, 0, 320 - TILE))
    tiles.append(_label(best[1][:, x0:x0 + TILE], "stream frame: cutline"))
    rows = [np.hstack(tiles[r * 4:(r + 1) * 4]) for r in range(4)]
    return np.vstack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/mosaic.png"))
    args = ap.parse_args(argv)
    mosaic = build_mosaic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), mosaic, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {args.out}")
    sys.stdout.write(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {mosaic.shape[1]}x{mosaic.shape[0]})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
