"""``knitwatch train|eval|predict|distill-teacher``: the model commands shared by every model kind."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.daemon.cli.common import EXIT_FAIL, CliError, add_device_option
from knitwatch.models.registry import trainable_kinds

log = structlog.get_logger(__name__)

MODEL_KINDS = tuple(trainable_kinds())


def _device(name: str) -> str:
    from knitwatch.pipeline.detector import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise CliError(str(e)) from None


def _images_as_tiles(folder: Path, tile: int, grayscale: bool) -> np.ndarray:
    """Generic images (penalty set, distillation set) cut/resized to tiles of ``tile`` px."""
    import cv2

    from knitwatch.pipeline.offline.dataset import DatasetError, read_image
    from knitwatch.pipeline.sources.base import IMAGE_SUFFIXES

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
    if not files:
        raise CliError(f"no images found in {folder}")
    out = []
    for p in files:
        try:
            img = read_image(p)
        except DatasetError as e:
            raise CliError(str(e)) from None
        if grayscale and img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if not grayscale and img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        h, w = img.shape[:2]
        s = min(h, w)
        if s < tile:  # small image: enlarge its centre square
            img = cv2.resize(img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s], (tile, tile))
            out.append(img)
            continue
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                out.append(img[y : y + tile, x : x + tile])
    return np.stack(out)


# ---------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from knitwatch.models.base import save_model
    from knitwatch.pipeline.offline.dataset import DatasetError
    from knitwatch.pipeline.offline.evaluate import load_tiles

    try:
        tiles, manifest = load_tiles(args.data)
        calib_tiles = calib_labels = None
        if args.val_data is not None:
            good, _ = load_tiles(args.val_data, split="test", label="good")
            bad_labels = sorted({t["label"] for t in _manifest(args.val_data)["tiles"]
                                 if t["split"] == "test" and t["label"] != "good"})
            bad = [load_tiles(args.val_data, split="test", label=lab)[0] for lab in bad_labels]
            calib_tiles = np.concatenate([good, *bad])
            calib_labels = np.r_[np.zeros(len(good)), np.ones(sum(len(b) for b in bad))].astype(np.int64)
    except DatasetError as e:
        raise CliError(f"{e} (make a tile dataset with 'knitwatch dataset build')") from None
    pre = manifest["preprocess"]
    device = _device(args.device)
    provenance = {
        "dataset": str(args.data),
        "dataset_created": manifest.get("created"),
        "train_tiles": int(len(tiles)),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv[1:]) if sys.argv else "",
        "device": device,
    }
    common = {"val_fraction": args.val_fraction, "device": device, "seed": args.seed, "progress": not args.quiet,
              "calib_tiles": calib_tiles, "calib_labels": calib_labels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    msflow = args.model.startswith("msflow-")
    trainer = _train_msflow if msflow else _train_efficientad
    if args.batch_size is None:
        args.batch_size = 16 if msflow else 1
    try:
        model, info = trainer(args, tiles, pre, common, torch)
    except ValueError as e:
        raise CliError(str(e)) from None
    provenance["id"] = f"{args.model}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    save_model(args.out, model, preprocess=pre, provenance=provenance, extra={"training": _jsonable(info)})
    log.info("checkpoint written", path=str(args.out), thresholds=model.thresholds(),
             seconds=round(float(info.get("seconds", 0.0)), 1))
    return 0


def _train_efficientad(args: argparse.Namespace, tiles: np.ndarray, pre: dict, common: dict,
                       torch: Any) -> tuple[Any, dict]:  # noqa: ANN401
    from knitwatch.models.efficientad.teacher import TeacherStateError, load_teacher_state
    from knitwatch.models.efficientad.train import train_efficientad

    size = args.model.split("-")[1]
    teacher = None
    if args.teacher is not None:
        try:
            teacher = load_teacher_state(args.teacher, size)
        except (TeacherStateError, OSError) as e:
            raise CliError(str(e)) from None
    grayscale = bool(pre.get("grayscale", True))
    penalty = _images_as_tiles(args.penalty_images, int(pre["tile"]), grayscale) if args.penalty_images else None
    resume_path = args.out.with_name(args.out.name + ".resume")
    resume_state = None
    if args.resume:
        if not resume_path.is_file():
            raise CliError(f"--resume: no resume state at {resume_path} (it is written during training)")
        resume_state = torch.load(resume_path, map_location="cpu", weights_only=True)
        log.info("resuming", step=int(resume_state["step"]), state=str(resume_path))
    if common["device"] == "cpu" and args.steps > 5000:
        log.warning("training on the CPU is slow: about 1 s per step for 64 px tiles at batch 8", steps=args.steps)

    def checkpoint_cb(step: int, model: Any, state: dict) -> None:  # noqa: ANN401
        tmp = resume_path.with_name(resume_path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(resume_path)
        log.info("resume state saved", step=step, path=str(resume_path))

    result = train_efficientad(
        tiles, size=size, steps=args.steps, teacher_state=teacher, penalty_tiles=penalty,
        batch_size=args.batch_size, checkpoint_cb=checkpoint_cb, checkpoint_every=args.checkpoint_every,
        resume_state=resume_state, teacher_distill_steps=args.distill_steps,
        allow_random_teacher=args.allow_random_teacher, **common,
    )
    resume_path.unlink(missing_ok=True)
    return result


def _train_msflow(args: argparse.Namespace, tiles: np.ndarray, pre: dict, common: dict,
                  torch: Any) -> tuple[Any, dict]:  # noqa: ANN401
    from knitwatch.models.backbones.extractor import BackboneWeightsMissingError
    from knitwatch.models.msflow.train import train_msflow

    backbone = args.model[len("msflow-") :]
    try:
        return train_msflow(tiles, backbone=backbone, weights_path=args.backbone_weights,
                            meta_epochs=args.meta_epochs, sub_epochs=args.sub_epochs, batch_size=args.batch_size,
                            **common)
    except BackboneWeightsMissingError as e:
        raise CliError(str(e)) from None


def _manifest(path: Path) -> dict:
    from knitwatch.pipeline.offline.dataset import load_manifest

    return load_manifest(path)


def _jsonable(v: Any) -> Any:  # noqa: ANN401
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float | int | str | bool) or v is None:
        return v if not isinstance(v, float) or np.isfinite(v) else None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _jsonable(v.item())
    return str(v)


# ---------------------------------------------------------------- eval / predict


def _load_detector(path: Path, device: str) -> Any:  # noqa: ANN401
    from knitwatch.models.checkpoint import CheckpointError
    from knitwatch.pipeline.detector import load_detector

    try:
        return load_detector(path, _device(device), "auto")
    except CheckpointError as e:
        raise CliError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.offline.dataset import DatasetError
    from knitwatch.pipeline.offline.evaluate import compute_metrics, score_folder

    det = _load_detector(args.checkpoint, args.device)
    t0 = time.monotonic()
    try:
        results = score_folder(det, args.data, split="test", progress=not args.quiet)
    except DatasetError as e:
        raise CliError(str(e)) from None
    m = compute_metrics(results, image_threshold=det.image_threshold)
    m["seconds"] = round(time.monotonic() - t0, 2)
    m["checkpoint"] = str(args.checkpoint)
    m["data"] = str(args.data)
    if args.json:
        sys.stdout.write(json.dumps(m, indent=2) + "\n")
    else:
        for k, v in m.items():
            sys.stdout.write(f"{k:28s} {v:.4f}\n" if isinstance(v, float) else f"{k:28s} {v}\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import cv2

    from knitwatch.pipeline.decision.regions import find_regions, frame_score
    from knitwatch.pipeline.offline.dataset import DatasetError, read_image
    from knitwatch.pipeline.offline.evaluate import ImageScorer
    from knitwatch.pipeline.overlay import render_overlay

    det = _load_detector(args.checkpoint, args.device)
    scorer = ImageScorer(det)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    failed = 0
    for path in args.images:
        try:
            img = read_image(path)
        except DatasetError as e:
            log.error("skipped", image=str(path), error=str(e))
            failed += 1
            continue
        amap, valid, grid, ts = scorer.score(img)
        score = frame_score(ts, grid.valid)
        d = find_regions(np.where(valid, amap, 0), pixel_threshold=det.pixel_threshold,
                         image_threshold=det.image_threshold, min_area_px=args.min_area)
        overlay = render_overlay(img, amap, d.regions, d.mask, pixel_threshold=det.pixel_threshold,
                                 image_threshold=det.image_threshold, title=f"{path.name}  score {score:.3f}")
        out = args.out / f"{path.stem}_overlay.png"
        cv2.imwrite(str(out), overlay)
        rows.append({"image": str(path), "decision": "defect" if d.defect else "ok", "score": round(score, 5),
                     "regions": len(d.regions), "overlay": str(out)})
        log.info("predicted", **rows[-1])
    with open(args.out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "decision", "score", "regions", "overlay"])
        w.writeheader()
        w.writerows(rows)
    return EXIT_FAIL if failed else 0


# ---------------------------------------------------------------- distill-teacher


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from knitwatch.models.backbones.extractor import BackboneWeightsMissingError
    from knitwatch.models.efficientad.teacher import distill_teacher

    tiles = _images_as_tiles(args.images, args.tile, grayscale=False)
    log.info("distilling teacher", tiles=len(tiles), backbone=args.backbone, size=args.size, steps=args.steps)
    try:
        teacher = distill_teacher(tiles, args.size, args.backbone, args.steps, batch_size=args.batch_size,
                                  device=_device(args.device), seed=args.seed, progress=not args.quiet)
    except (BackboneWeightsMissingError, ValueError) as e:
        raise CliError(str(e)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(teacher.state_dict, tmp)  # the public teacher_small.pth layout: loadable with --teacher
    tmp.replace(args.out)
    log.info("teacher written", path=str(args.out), **{k: v for k, v in teacher.info.items()
                                                          if isinstance(v, int | float | str)})
    return 0


# ---------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a model on a tile dataset; writes one checkpoint file",
                        description="Train an anomaly model on the normal tiles of a dataset built with "
                        "'knitwatch dataset build'. The checkpoint holds weights, normalisation, "
                        "calibrated thresholds and the dataset's preprocessing.")
    tr.add_argument("data", type=Path, metavar="DATA", help="tile dataset (folder with manifest.json)")
    tr.add_argument("--model", choices=MODEL_KINDS, default="efficientad-s")
    tr.add_argument("--out", type=Path, required=True, metavar="CKPT", help="checkpoint file to write")
    tr.add_argument("--steps", type=int, default=70000, help="EfficientAD training steps (paper: 70000)")
    tr.add_argument("--batch-size", type=int, default=None,
                    help="tiles per step (default: EfficientAD 1 as the paper, MSFlow 16)")
    tr.add_argument("--meta-epochs", type=int, default=25, help="MSFlow meta-epochs (seed: 25)")
    tr.add_argument("--sub-epochs", type=int, default=4, help="MSFlow sub-epochs per meta-epoch (seed: 4)")
    tr.add_argument("--backbone-weights", type=Path, metavar="FILE",
                    help="MSFlow: torchvision weights file of the backbone (default: torch hub cache)")
    tr.add_argument("--teacher", type=Path, help="PDN teacher state dict (teacher_small.pth layout); "
                    "default: distil one from EfficientNet-Lite0 on the training tiles")
    tr.add_argument("--distill-steps", type=int, default=10000, help="teacher distillation steps without --teacher")
    tr.add_argument("--penalty-images", type=Path, help="folder of generic (non-fabric) images for the penalty loss")
    tr.add_argument("--val-fraction", type=float, default=0.1, help="normal tiles held out for calibration")
    tr.add_argument("--val-data", type=Path, help="tile dataset whose labelled test tiles set the F1-optimal threshold")
    tr.add_argument("--allow-random-teacher", action="store_true",
                    help="allow an untrained teacher when no backbone weights exist (marked in the checkpoint)")
    tr.add_argument("--checkpoint-every", type=int, default=1000, help="steps between resume states")
    tr.add_argument("--resume", action="store_true", help="continue from CKPT.resume")
    add_device_option(tr)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train, batch_size=None)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on whole images with masks",
                        description="Tile the test images of DATA (MVTec layout of whole images or strips) "
                        "with the checkpoint's preprocessing, stitch the maps back and report image AUROC, "
                        "pixel AUROC, AU-PRO, tile AUROC within defective images, F1/precision/recall at "
                        "the stored threshold, throughput and peak memory.")
    ev.add_argument("checkpoint", type=Path, metavar="CKPT")
    ev.add_argument("data", type=Path, metavar="DATA")
    ev.add_argument("--json", action="store_true", help="print JSON")
    add_device_option(ev)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="decide on images and save segmented overlays plus a CSV",
                        description="For each image: decision, score and an overlay with the defect "
                        "regions outlined, written to DIR with predictions.csv.")
    pr.add_argument("checkpoint", type=Path, metavar="CKPT")
    pr.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    pr.add_argument("--out", type=Path, required=True, metavar="DIR")
    pr.add_argument("--min-area", type=int, default=20, help="smallest defect region in pixels (default 20)")
    add_device_option(pr)
    pr.set_defaults(func=cmd_predict)

    di = sub.add_parser("distill-teacher", help="distil an EfficientAD teacher from an offline backbone",
                        description="Distil a PDN teacher (the paper's recipe, backbone substituted) on a "
                        "folder of images; the output loads with 'knitwatch train --teacher'.")
    di.add_argument("images", type=Path, metavar="IMAGES", help="folder of images (searched recursively)")
    di.add_argument("--out", type=Path, required=True, metavar="PATH")
    di.add_argument("--size", choices=["s", "m"], default="s")
    di.add_argument("--backbone", choices=["efficientnet-lite0", "wide_resnet101_2"], default="efficientnet-lite0")
    di.add_argument("--tile", type=int, default=256, help="tile size the images are cut to (default 256)")
    di.add_argument("--steps", type=int, default=10000)
    di.add_argument("--batch-size", type=int, default=8)
    add_device_option(di)
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.set_defaults(func=cmd_distill)
