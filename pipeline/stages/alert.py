"""Alert stage: per-frame decisions, k-of-n confirmation, events, and per-camera statistics.

Every result gets a decision (logged at debug level, defects at info; optionally appended to a
JSON-lines decisions file as an audit trail). A confirmed defect outside the cool-down becomes an
*event*, logged at warning level.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import zmq

from knitwatch.pipeline.decision import Confirmation, find_regions
from knitwatch.pipeline.stages.common import Stage, percentiles


class CameraState:
    def __init__(self, k: int, n: int) -> None:
        self.confirm = Confirmation(k, n)
        self.epoch: int | None = None
        self.inspected = 0
        self.defect_frames = 0
        self.events = 0
        self.last_event_seq: int | None = None
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=1000)


class AlertStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, results_endpoint: str, thresholds: dict,
                 alert: dict, cameras: list[dict], decisions_path: str | None = None) -> None:
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.PULL, results_endpoint, bind=True, hwm=4)
        self.cfg = alert
        self.image_threshold = float(alert.get("image_threshold") or thresholds["image"])
        default_pixel = alert.get("pixel_threshold") or thresholds.get("pixel", thresholds["image"])
        self.pixel_threshold = {c["id"]: float(c.get("pixel_threshold") or default_pixel) for c in cameras}
        self.cams: dict[str, CameraState] = {}
        self.decisions = Path(decisions_path).open("a", encoding="utf-8") if decisions_path else None

    def _camera(self, cam: str, epoch: int | None) -> CameraState:
        st = self.cams.get(cam)
        if st is None:
            st = self.cams[cam] = CameraState(self.cfg["confirm_k"], self.cfg["confirm_n"])
        if epoch != st.epoch:  # the capture process restarted: sequence numbers start again
            st.epoch = epoch
            st.confirm = Confirmation(self.cfg["confirm_k"], self.cfg["confirm_n"])
            st.last_event_seq = None
        return st

    def step(self) -> None:
        msg = self.receive(self.inp, 100)
        if msg is None:
            return
        cam, seq = msg["cam"], int(msg["seq"])
        amap = msg.arrays[0]
        pixel_thr = self.pixel_threshold.get(cam)
        if pixel_thr is None:
            self.counters["unknown_camera"] += 1
            return
        decision = find_regions(amap, pixel_threshold=pixel_thr, image_threshold=self.image_threshold,
                                min_area_px=self.cfg["min_area_px"])
        st = self._camera(cam, msg.header.get("epoch"))
        st.inspected += 1
        confirmed = st.confirm.update(seq, decision.defect)
        latency_ms = (time.monotonic_ns() - int(msg["t_mono_ns"])) / 1e6
        st.latency_ms.append(latency_ms)
        event = False
        if confirmed and decision.defect:
            cooldown = self.cfg["cooldown_frames"]
            if st.last_event_seq is None or seq - st.last_event_seq > cooldown:
                event = True
                st.events += 1
            st.last_event_seq = seq
        if decision.defect:
            st.defect_frames += 1
        self.counters["inspected"] += 1
        record = {
            "cam": cam,
            "seq": seq,
            "score": round(float(msg["image_score"]), 5),
            "defect": decision.defect,
            "confirmed": confirmed,
            "event": event,
            "regions": [r.to_dict() for r in decision.regions[:10]],
            "latency_ms": round(latency_ms, 2),
        }
        if "truth" in msg.header:
            record["truth"] = msg["truth"]
        self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        if record["event"]:
            self.log.warning("defect event", **{k: v for k, v in record.items() if k not in ("truth", "event")})
        elif record["defect"]:
            self.log.info("defect frame", cam=record["cam"], seq=record["seq"], score=record["score"],
                          confirmed=record["confirmed"])
        else:
            self.log.debug("frame ok", cam=record["cam"], seq=record["seq"], score=record["score"])
        if self.decisions is not None:
            self.decisions.write(json.dumps(record) + "\n")
            self.decisions.flush()

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["cameras"] = {
            cam: {
                "inspected": st.inspected,
                "defect_frames": st.defect_frames,
                "events": st.events,
                "latency_ms": percentiles(list(st.latency_ms)),
            }
            for cam, st in self.cams.items()
        }
        return s

    def on_stop(self) -> None:
        if self.decisions is not None:
            self.decisions.close()


def run(**kwargs: object) -> int:
    return AlertStage(**kwargs).run()
