"""The simulated knit data set: :func:`write_synth_dataset` writes pictures of the knit simulator
(:mod:`knitwatch.pipeline.sources.knitsim`) with their defect masks in MVTec AD layout, for training and
benchmarks (``knitwatch dataset synth``, ``knitwatch bench accuracy``)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

from knitwatch.pipeline.sources.knitsim import DEFECT_KINDS, FabricSpec, render_labelled_sample


def _vary(spec: FabricSpec, rng: np.random.Generator) -> FabricSpec:
    return replace(
        spec,
        brightness=float(np.clip(spec.brightness * math.exp(rng.normal(0.0, 0.08)), 25.0, 225.0)),
        irregularity=float(spec.irregularity * rng.uniform(0.8, 1.25)),
        contrast=float(spec.contrast * rng.uniform(0.9, 1.1)),
    )


def write_synth_dataset(out_dir: Path, n_normal: int, n_defect: int, *, size: int = 256,
                        spec: FabricSpec = FabricSpec(), seed: int = 0,
                        defect_kinds: Sequence[str] = DEFECT_KINDS, cutline_fraction: float = 0.15,
                        progress: bool = True) -> dict:
    """Write a synthetic data set in MVTec AD layout and return a summary.

    ``train/good`` (~80 % of ``n_normal``) and ``test/good`` (the rest) hold normal fabric, a
    ``cutline_fraction`` of it with a cutline; ``test/<kind>`` holds ``n_defect`` pictures spread
    round-robin over ``defect_kinds``, each with ``ground_truth/<kind>/<stem>_mask.png``. Every
    picture varies brightness, contrast, irregularity and a mild lighting gradient around ``spec``.
    ``dataset.json`` records the summary and each picture's parameters. The set is written to a
    temporary folder beside ``out_dir`` and renamed at the end; an existing ``out_dir`` is replaced
    only when it is empty or holds a ``dataset.json`` (a set written here), else FileExistsError."""
    out_dir = Path(out_dir)
    kinds = list(defect_kinds)
    for k in kinds:
        if k not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {k!r}; one of {DEFECT_KINDS}")
    if n_normal < 0 or n_defect < 0 or (n_defect > 0 and not kinds):
        raise ValueError("n_normal and n_defect must be >= 0, and defects need at least one kind")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "dataset.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a knitsim data set; not replacing it")

    n_train = int(round(0.8 * n_normal))
    jobs: list[tuple[str, str, str | None]] = []  # (subdir, stem, defect)
    jobs += [("train/good", f"{i:04d}", None) for i in range(n_train)]
    jobs += [("test/good", f"{i:04d}", None) for i in range(n_normal - n_train)]
    counts = dict.fromkeys(kinds, 0)
    for i in range(n_defect):
        k = kinds[i % len(kinds)]
        jobs.append((f"test/{k}", f"{counts[k]:04d}", k))
        counts[k] += 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    records = []
    n_cut = 0
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="knitsim", unit="img")
        for idx, (sub, stem, kind) in enumerate(jobs):
            ss_ = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, 0xDA7A, idx])
            rng = np.random.default_rng(ss_)
            img_seed = int(ss_.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
            s = _vary(spec, rng)
            cut = bool(rng.random() < cutline_fraction)
            n_cut += cut
            kw: dict = {}
            if kind is not None:
                kw = {"size": float(rng.uniform(0.6, 1.6)), "intensity": float(rng.uniform(0.6, 1.2))}
            img, mask, info = render_labelled_sample(size, size, s, img_seed, kind, cut, 0.06, kw, tint_seed=seed)
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            _imwrite(tmp / sub / f"{stem}.png", img)
            rec = {"file": f"{sub}/{stem}.png", "defect": kind, "cutline": cut, "seed": img_seed,
                   "brightness": round(s.brightness, 2), "irregularity": round(s.irregularity, 4),
                   "contrast": round(s.contrast, 3), **kw}
            if "cutline_box" in info:
                rec["cutline_box"] = list(info["cutline_box"])
            if kind is not None:
                (tmp / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                _imwrite(tmp / "ground_truth" / kind / f"{stem}_mask.png", mask)
                rec["mask"] = f"ground_truth/{kind}/{stem}_mask.png"
            records.append(rec)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        summary = {
            "out_dir": str(out_dir),
            "size": size,
            "seed": seed,
            "spec": asdict(spec),
            "train_good": n_train,
            "test_good": n_normal - n_train,
            "test_defect": counts,
            "cutline_images": n_cut,
            "total": len(jobs),
        }
        (tmp / "dataset.json").write_text(json.dumps({**summary, "images": records}, indent=1))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _imwrite(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
