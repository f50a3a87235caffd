"""A model library with real checkpoints for the ``model`` CLI, API and web-page tests: the demo's model
(knitwatch-demo/model.ckpt, copied as a file) when it is there, else an untrained EfficientAD-S checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from knitwatch.models.articles import Library, ModelVersion
from tests.helpers.models import untrained_checkpoint
from tests.helpers.paths import ROOT

DEMO_CKPT = ROOT / "knitwatch-demo" / "model.ckpt"


def a_checkpoint(tmp: Path) -> Path:
    """A real checkpoint file: the demo model when present, else an untrained one written into ``tmp``."""
    if DEMO_CKPT.is_file():
        return DEMO_CKPT
    return untrained_checkpoint(tmp / "untrained.ckpt")


def model_meta(ckpt: Path, **figures: float) -> dict[str, Any]:
    """The library metadata of ``ckpt`` (kind, preprocess, thresholds read from the file) plus validation
    figures (e.g. ``false_stops_per_hour=0.5``)."""
    from knitwatch.models.checkpoint import load_checkpoint

    c = load_checkpoint(ckpt)
    return {"kind": c.kind, "preprocess": c.preprocess, "thresholds": c.thresholds, "validation": dict(figures)}


def populate_library(root: Path, ckpt: Path, versions: list[tuple[str, float, float]]) -> list[ModelVersion]:
    """Add (article, false stops per hour, recall) versions to the library in ``root``, in order."""
    lib = Library(root)
    meta = model_meta(ckpt)
    return [lib.add(article, ckpt, {**meta, "validation": {"false_stops_per_hour": fsph, "recall": recall}})
            for article, fsph, recall in versions]


# Stands in for `python -m knitwatch.daemon --config CFG learn record|train ...` (same arguments and exit codes).
FAKE_LEARN = r'''
import argparse, json, sys, time
from pathlib import Path
import numpy as np
from knitwatch.config import load_settings
from knitwatch.models.articles import Library, library_dir
from knitwatch.pipeline.recording import Recording, RecordingWriter

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("group", choices=["learn"])
p.add_argument("cmd", choices=["record", "train"])
for flag in ("--camera", "--article", "--out", "--recording", "--model"):
    p.add_argument(flag)
for flag in ("--via-daemon", "--direct", "--quiet", "--json", "--use"):
    p.add_argument(flag, action="store_true")
p.add_argument("--frames", type=int)
p.add_argument("--minutes", type=float)
p.add_argument("--steps", type=int)
a = p.parse_args()
settings = load_settings(a.config)  # the daemon's settings, as the job runner wrote them
assert a.camera is None or a.camera in [c.id for c in settings.cameras]
lib = Library(library_dir(settings))
if a.cmd == "record":
    assert a.via_daemon and (a.frames or a.minutes)
    if a.article == "broken":
        sys.stderr.write("knitwatch: error: no fabric texture in the recorded frames\n")
        sys.exit(2)
    w = RecordingWriter(a.out, article=a.article, camera=a.camera, how="daemon", target_frames=a.frames or 10**6,
                        min_revolutions=2)
    try:
        for i in range(100000):
            frame = np.full((16, 16), i % 256, np.uint8)
            if w.add(frame, seq=i, pos={"ok": True, "rev": i // 4}, t_wall_ns=time.time_ns()):
                break
            time.sleep(0.5 if a.article.startswith("slow") else 0.12)
    except KeyboardInterrupt:
        w.finish("cancelled")
        sys.stderr.write("knitwatch: interrupted\n")
        sys.exit(130)
    sys.exit(0)
rec = Recording(a.recording)
assert rec.meta["status"] == "done" and len(rec) > 0
for pct in (0, 25, 50, 75, 100):
    sys.stderr.write(f"\rtraining {a.article}: {pct:3d}%|{'#' * (pct // 10)}| {pct}/100")
    sys.stderr.flush()
    time.sleep(0.15)
sys.stderr.write("\nknitwatch: validating on 4 held-back frames\n")
sys.stderr.flush()
time.sleep(0.6)
if a.article.startswith("refuse"):
    print(json.dumps({"installed": False, "refused": "estimated 4.00 false stops per hour exceed the limit 1.0"}))
    sys.stderr.write("knitwatch: the new model is refused, not installed: estimated 4.00 false stops per hour\n")
    sys.exit(3)
meta = json.loads(Path(sys.argv[0]).with_name("meta.json").read_text())
m = lib.add(a.article, Path(meta.pop("checkpoint")), {**meta, "recording": a.recording,
                                                      "frames": {"recorded": len(rec)}})
if a.use:
    lib.use(a.camera, m.id)
print(json.dumps({"installed": True, "model": m.id, "false_stops_per_hour": 0.0, "train_frames": len(rec)}))
'''


def fake_learn_command(folder: Path, ckpt: Path) -> list[str]:
    """The command line of :data:`FAKE_LEARN` written into ``folder``; it installs ``ckpt``."""
    (folder / "learn.py").write_text(FAKE_LEARN, encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({**model_meta(ckpt, false_stops_per_hour=0.0),
                                                  "checkpoint": str(ckpt)}), encoding="utf-8")
    return [sys.executable, str(folder / "learn.py")]
