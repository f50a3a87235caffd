"""``knitwatch dataset synth|build``: simulated knit datasets and the tile builder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from knitwatch.daemon.cli.common import CliError, add_group

log = structlog.get_logger(__name__)


def cmd_synth(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.offline.synth import write_synth_dataset
    from knitwatch.pipeline.sources.knitsim import DEFECT_KINDS, FabricSpec

    kinds = args.defects.split(",") if args.defects else list(DEFECT_KINDS)
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown:
        raise CliError(f"unknown defect kind(s) {', '.join(unknown)}; known: {', '.join(DEFECT_KINDS)}")
    try:
        spec = FabricSpec(texture=args.texture, pitch_px=args.pitch, brightness=args.brightness, color=args.color)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        summary = write_synth_dataset(args.out, args.normal, args.defective, size=args.size, spec=spec,
                                      seed=args.seed, defect_kinds=kinds, progress=not args.quiet)
    except (FileExistsError, ValueError) as e:
        raise CliError(str(e)) from None
    counts = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    log.info("synthetic dataset written", out=str(args.out), **counts)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.offline.dataset import DatasetError, build_dataset

    try:
        manifest = build_dataset(
            args.src, args.out, tile=args.tile, stride=args.stride, target_pitch=args.target_pitch,
            scale=args.scale, photometric=args.photometric, min_defect_px=args.min_defect_px,
            min_tile_std=args.min_tile_std, grayscale=not args.color, progress=not args.quiet,
        )
    except (DatasetError, ValueError) as e:
        raise CliError(str(e)) from None
    sys.stdout.write(json.dumps({"out": str(args.out), "preprocess": manifest["preprocess"],
                                 "counts": manifest["counts"]}, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    dsub = add_group(sub, "dataset", "make training/test data: simulated knit fabric, tiles from photos",
                     "dataset_command")

    sy = dsub.add_parser(
        "synth",
        help="write simulated knitted fabric (normal and defective, with masks) in the MVTec layout",
        description="Write N normal and M defective simulated knit images with pixel-exact masks: "
        "OUT/train/good, OUT/test/good, OUT/test/<defect>, OUT/ground_truth/<defect>/<stem>_mask.png.",
    )
    sy.add_argument("out", type=Path, metavar="OUT", help="output folder (new or empty)")
    sy.add_argument("--normal", type=int, default=100, help="normal images (80%% train, 20%% test; default 100)")
    sy.add_argument("--defective", type=int, default=35, help="defective images, spread over the kinds (default 35)")
    sy.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    sy.add_argument("--pitch", type=float, default=6.0, help="loop pitch in pixels (default 6)")
    sy.add_argument("--texture", choices=["jersey", "pique"], default="jersey")
    sy.add_argument("--brightness", type=float, default=128.0, help="mean gray level (default 128)")
    sy.add_argument("--color", action="store_true", help="colour (BGR) images instead of grayscale")
    sy.add_argument("--defects", default="", help="comma-separated defect kinds (default: all)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--quiet", action="store_true", help="no progress bar")
    sy.set_defaults(func=cmd_synth)

    b = dsub.add_parser(
        "build",
        help="cut a folder of fabric images into model tiles at a common loop size",
        description="Estimate each image's loop pitch, rescale to a common pitch, cut tiles (the same "
        "preprocessing the live tiler runs), label tiles from masks, and write an MVTec-layout tile "
        "dataset with manifest.json (whose 'preprocess' training copies into the checkpoint).",
    )
    b.add_argument("src", type=Path, metavar="SRC", help="images: MVTec layout, folder per label, or flat")
    b.add_argument("out", type=Path, metavar="OUT", help="output folder (new or empty)")
    b.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    b.add_argument("--stride", type=int, default=None, help="tile stride (default: the tile size)")
    b.add_argument("--target-pitch", type=float, default=None,
                   help="loop pitch to rescale every image to (default: median pitch of the training images)")
    b.add_argument("--scale", type=float, default=None, help="fixed resize factor for all images (skips pitch)")
    b.add_argument("--photometric", choices=["none", "standardize"], default="none",
                   help="per-image gray-level/contrast standardisation (default none)")
    b.add_argument("--min-defect-px", type=int, default=10, help="mask pixels that make a tile defective")
    b.add_argument("--min-tile-std", type=float, default=2.0, help="tiles below this std are blank padding")
    b.add_argument("--color", action="store_true", help="keep colour (default: grayscale tiles)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)
