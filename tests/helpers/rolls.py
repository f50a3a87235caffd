"""A store holding one roll with three defects whose report numbers are known by hand, and the config
that grades it: for the roll tests (CLI, API, browser)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from knitwatch.config.settings import RollConfig
from knitwatch.pipeline.store.database import Store

ROLL_TOML = """
[store]
path = "{store}"
fsync = false

[roll]
machine = "M1"
fabric_width_m = 1.8
metres_per_revolution = 0.1
pixels_per_mm = 2.0
four_point_severities = ["hole"]

[[cameras]]
id = "c"
"""
ROLL_CFG = RollConfig(machine="M1", fabric_width_m=1.8, metres_per_revolution=0.1, pixels_per_mm=2.0,
                      four_point_severities=["hole"])
# (severity, best box, revolution, tube column of 1000); the roll runs from revolution 10 to 510 (50 m)
DEFECTS = [("minor", [0, 0, 100, 40], 20, 250.0),  # 50 mm: 1 point, 1.025 m (yard 1)
           ("major", [0, 0, 60, 300], 110, 0.0),  # 150 mm: 2 points, 10.0 m (yard 10)
           ("hole", [0, 0, 10, 10], 110, 500.0)]  # a hole: 4 points, 10.05 m (yard 10: 6 capped to 4)


def fill(root: Path) -> tuple[int, list[int]]:
    """A store with a roll the alert stage took at revolution 10, three events with pictures, the roll
    now at revolution 510: 5 points on 50 m x 1.8 m."""
    store = Store(root, retention_days=3650, max_gb=1, fsync=False)
    rid = store.new_roll("command", "anna", note="article 42", machine="M1", cameras=["c"])
    store.roll_handled(rid, {"c": 10.0})
    ids = []
    img = np.full((24, 32, 3), 140, np.uint8)
    for i, (sev, box, rev, x) in enumerate(DEFECTS):
        rec = {"regions": [{"bbox": box, "area": 50, "peak": 2.0}],
               "track": {"revolution": rev, "tube_x": x, "circumference_px": 1000.0}}
        eid = store.add_event(rec, camera="c", t_wall_ns=time.time_ns() + i, seq=i, severity=sev, action="stop",
                              image_score=2.0, max_area_px=50)
        assert store.write_files(eid, {"frame": img, "overlay": img, "mask": img[..., 0], "thumb": img})
        ids.append(eid)
    store.update_roll_position(rid, {"c": 510.0})
    store.close()
    return rid, ids
