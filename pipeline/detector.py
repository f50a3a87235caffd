"""A loaded model as the pipeline sees it: tiles in, maps and scores out, plus its thresholds and
preprocessing - everything from one checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from knitwatch.models.checkpoint import build_model, load_checkpoint

log = structlog.get_logger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available (use 'auto' or 'cpu')")
    return device


@dataclass
class Detector:
    model: Any  # an nn.Module with predict(tiles) -> (maps, scores)
    kind: str
    preprocess: dict
    thresholds: dict
    checkpoint_id: str
    device: str
    info: dict = field(default_factory=dict)

    @property
    def image_threshold(self) -> float:
        return float(self.thresholds["image"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.thresholds.get("pixel", self.thresholds["image"]))

    def predict(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 tiles (N, H, W[, 3]) -> anomaly maps float32 (N, H, W) and tile scores float32 (N,)."""
        maps, scores = self.model.predict(tiles)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32)

    def warm_up(self, batch: int = 2) -> None:
        t = int(self.preprocess["tile"])
        shape = (batch, t, t) if self.preprocess.get("grayscale", True) else (batch, t, t, 3)
        self.predict(np.full(shape, 128, np.uint8))


def load_detector(path: str | Path, device: str = "auto") -> Detector:
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    model = build_model(ckpt).to(dev).eval()
    det = Detector(
        model=model,
        kind=ckpt.kind,
        preprocess=ckpt.preprocess,
        thresholds=ckpt.thresholds,
        checkpoint_id=str(ckpt.provenance.get("id", Path(path).name)),
        device=dev,
        info={"path": str(path)},
    )
    log.info("model loaded", path=str(path), kind=ckpt.kind, device=dev, thresholds=ckpt.thresholds)
    return det
