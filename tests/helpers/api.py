"""The stored events, settings and stats snapshot the API, CLI and web-page tests share: a real store
filled as the alert stage fills it (simulated fabric frames with defects, the decision and overlay
code's regions and pictures)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, CameraConfig, StoreConfig
from knitwatch.pipeline.decision.regions import find_regions
from knitwatch.pipeline.overlay import region_mask, render_overlay, thumbnail
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_sample
from knitwatch.pipeline.store.database import Store

TOKEN = "0123456789abcdef-test-token"
# (camera, defect kind, action, severity, minutes ago)
EVENTS = [
    ("cam0", "hole", "stop", "major", 300),
    ("cam0", "oil_stain", "alarm", "minor", 200),
    ("cam1", "needle_line", "stop", "major", 120),
    ("cam1", "slub", "log", "unclassified", 90),
    ("cam0", "ladder", "stop", "major", 45),
    ("cam1", "fly", "alarm", "minor", 20),
    ("cam0", "hole", "stop", "intense", 5),
]


def populate_store(root: Path, events: list[tuple] = EVENTS, width: int = 512, height: int = 256,
                   now_ns: int | None = None) -> list[int]:
    """Write events into a real store as the alert stage does: a simulated fabric frame with a defect,
    an anomaly map peaking on the defect, regions from the decision code, the overlay drawing code."""
    store = Store.from_config(StoreConfig(path=root, fsync=False))
    now_ns = now_ns or time.time_ns()
    ids = []
    for i, (cam, kind, action, severity, minutes) in enumerate(events):
        spec = FabricSpec(pitch_px=6.0, brightness=120 + 10 * (i % 3))
        frame, mask = render_sample(height, width, spec, seed=100 + i, defect=kind,
                                    center=(width * (0.3 + 0.07 * i), height * 0.5), size=1.5)
        soft = cv2.GaussianBlur((mask > 0).astype(np.float32), (0, 0), 5.0)
        rng = np.random.default_rng(i)
        noise = (0.2 + 0.05 * rng.standard_normal((height, width))).astype(np.float32)
        amap = noise + 2.0 * soft / max(float(soft.max()), 1e-6)
        decision = find_regions(amap, pixel_threshold=0.8, image_threshold=1.0, min_area_px=10)
        t_wall = now_ns - minutes * 60 * 10**9
        record = {"camera": cam, "seq": 1000 + i, "severity": severity, "action": action,
                  "image_score": float(amap.max()), "regions": [r.to_dict() for r in decision.regions],
                  "n_regions": len(decision.regions),
                  "thresholds": {"image": 1.0, "pixel": 0.8}, "model": {"kind": "efficientad-s", "id": "test"},
                  "latency_ms": {"capture_to_decision": 180.0 + i}, "truth": {"kind": kind}, "actions": []}
        eid = store.add_event(record, camera=cam, t_wall_ns=t_wall, seq=1000 + i, severity=severity, action=action,
                              image_score=float(amap.max()),
                              max_area_px=max((r.area for r in decision.regions), default=0))
        overlay = render_overlay(frame, amap, decision.regions, decision.mask, pixel_threshold=0.8,
                                 image_threshold=1.0, title=f"{cam} #{1000 + i} {severity} score {amap.max():.3f}")
        assert store.write_files(eid, {"frame": frame, "overlay": overlay,
                                       "mask": region_mask(decision.mask, overlay.shape[:2]),
                                       "thumb": thumbnail(overlay, 320)})
        ids.append(eid)
    store.close()
    return ids


def make_settings(tmp: Path, **api: object) -> Settings:
    return Settings(cameras=[CameraConfig(id="cam0"), CameraConfig(id="cam1")],
                    store=StoreConfig(path=tmp / "store"), api=ApiConfig(**api))


SNAPSHOT = {
    "uptime_s": 3725.0, "ready": True, "healthy": True,
    "cameras": {"cam0": {"captured": 7400, "inspected": 7400, "dropped": 0, "fps": 2.0, "coverage": 1.0,
                         "latency_ms": {"p50": 212.0, "p99": 388.0}, "events": 4},
                "cam1": {"captured": 7390, "inspected": 7301, "dropped": 89, "fps": 1.98, "coverage": 0.94,
                         "latency_ms": {"p50": 230.0, "p99": 512.0}, "events": 3}},
    "stages": {"alert": {"alive": True, "restarts": 0, "actions": {"driver": "modbus", "plc_connected": True,
                                                                   "failures": 2}},
               "infer.0": {"alive": True, "restarts": 1, "model_ms": {"p50": 80.0, "p99": 120.0},
                           "cuda_memory_allocated_bytes": 123456789},
               "capture.cam0": {"alive": True, "restarts": 0}},
    "lost_in_flight": {"total": 7, "by_stage": {"infer.0": 7}},  # the frames infer.0 died with at its restart
    "gpu": {"devices": [{"index": 0, "name": "NVIDIA Test", "uuid": "GPU-x", "utilization_percent": 37,
                         "memory_used_bytes": 2 * 10**9, "memory_total_bytes": 80 * 10**9}],
            "cuda_memory_allocated_bytes": {"infer.0": 123456789}},
}
