"""Alert stage: per-frame decisions, k-of-n confirmation, severity, events, actions and snapshots.

Every result gets a decision (logged at debug level, defects at info; optionally appended to a
JSON-lines decisions file as an audit trail). A confirmed defect outside the cool-down becomes an
*event*, logged at warning level: its severity class (by region area and score) picks the action
(``stop`` | ``alarm`` | ``log``); the event's row is committed to the store, the action is handed to
the action runner (a worker thread: PLC writes, retries, latch, heartbeat - never blocking this
loop), and then the snapshot files are written (frame, overlay, mask, thumbnail, JSON record). A
later frame within the cool-down whose severity ranks higher *escalates* the event (alarm -> stop).
A failing store (disk full ...) is counted and logged; inspection and actions go on without it.
"""

from __future__ import annotations

import collections
import json
import queue
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, PlcConfig, StoreConfig
from knitwatch.pipeline.actions import Job, build_runner, event_env
from knitwatch.pipeline.decision.regions import Confirmation, FrameDecision, find_regions
from knitwatch.pipeline.decision.severity import RANK, Severity, SeverityClass, classify
from knitwatch.pipeline.overlay import region_mask, render_overlay, thumbnail
from knitwatch.pipeline.stages.common import Stage, percentiles
from knitwatch.pipeline.store.database import Store, StoreError, iso_utc

log = structlog.get_logger(__name__)

RETENTION_EVERY_S = 300.0
STORE_STATS_EVERY_S = 5.0


@dataclass
class Snapshot:
    event_id: int
    head: dict[str, Any]
    amap: np.ndarray
    frame: np.ndarray
    decision: FrameDecision
    severity: Severity
    pixel_threshold: float


class SnapshotWriter:
    """Draws and writes event pictures in a thread, so the stage's loop never waits for PNG encoding
    and disk writes; also runs the store's retention. A full queue (a burst of events on a slow disk)
    flags the event ``files_missing`` instead of waiting."""

    def __init__(self, store: Store, *, image_threshold: float, thumbnail_px: int, maxsize: int = 8) -> None:
        self.store = store
        self.image_threshold = image_threshold
        self.thumbnail_px = thumbnail_px
        self.counters: Counter[str] = Counter()
        self._q: queue.Queue[Snapshot | None] = queue.Queue(maxsize=maxsize)
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
        self._thread = threading.Thread(target=self._run, name="knitwatch-snapshots", daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot) -> None:
        try:
            self._q.put_nowait(snap)
        except queue.Full:
            self.counters["snapshots_dropped"] += 1
            self.store.mark_files_missing(snap.event_id, "snapshot queue full (disk too slow?)")

    def backlog(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            try:
                snap = self._q.get(timeout=1.0)
            except queue.Empty:
                pass
            else:
                if snap is None:
                    return
                self._write(snap)
            if time.monotonic() >= self._next_retention:
                self._next_retention = time.monotonic() + RETENTION_EVERY_S
                self.store.enforce_retention()

    def _write(self, snap: Snapshot) -> None:
        head = snap.head
        try:
            title = f"{head['cam']} #{head['seq']} {snap.severity.name} score {float(head['image_score']):.3f}"
            overlay = render_overlay(snap.frame, snap.amap, snap.decision.regions, snap.decision.mask,
                                     pixel_threshold=snap.pixel_threshold, image_threshold=self.image_threshold,
                                     title=title)
            images = {"frame": np.ascontiguousarray(snap.frame), "overlay": overlay,
                      "mask": region_mask(snap.decision.mask, overlay.shape[:2]),
                      "thumb": thumbnail(overlay, self.thumbnail_px)}
        except Exception as e:  # a frame we cannot draw on must not stop anything
            log.exception("cannot draw the event's pictures", event_id=snap.event_id)
            self.counters["snapshot_errors"] += 1
            self.store.mark_files_missing(snap.event_id, f"{type(e).__name__}: {e}")
            return
        if self.store.write_files(snap.event_id, images):
            self.counters["snapshots"] += 1
        else:
            self.counters["snapshot_errors"] += 1
        self.store.enforce_retention()

    def stop(self, timeout: float = 2.0) -> None:
        """Finish what is queued within ``timeout`` (what is left is repaired at the next start)."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)


class CameraState:
    def __init__(self, k: int, n: int) -> None:
        self.confirm = Confirmation(k, n)
        self.epoch: int | None = None
        self.inspected = 0
        self.defect_frames = 0
        self.events = 0
        self.escalations = 0
        self.last_event_seq: int | None = None
        self.last_event_id: int | None = None
        self.last_event_rank = -1
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=1000)


class AlertStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, results_endpoint: str, thresholds: dict,
                 alert: AlertConfig, cameras: list[CameraConfig], plc: PlcConfig | None = None,
                 store: StoreConfig | None = None, model: dict | None = None, ack_poll_s: float = 0.5) -> None:
        """``plc``: the ``[plc]`` section (its defaults when None); ``store``: None runs without a store."""
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.PULL, results_endpoint, bind=True, hwm=4)
        self.cfg = alert
        self.classes = [SeverityClass.from_dict(c.model_dump()) for c in alert.severity]
        def first_set(*values: float | None) -> float:  # an override of 0.0 is still an override
            return float(next(v for v in values if v is not None))

        self.image_threshold = first_set(alert.image_threshold, thresholds["image"])
        default_pixel = first_set(alert.pixel_threshold, thresholds.get("pixel"), thresholds["image"])
        self.pixel_threshold = {c.id: first_set(c.pixel_threshold, default_pixel) for c in cameras}
        self.cams: dict[str, CameraState] = {}
        self.decisions = Path(alert.decisions_log).open("a", encoding="utf-8") if alert.decisions_log else None
        self.model = dict(model or {})
        self.store: Store | None = None
        self.writer: SnapshotWriter | None = None
        if store is not None:
            try:
                self.store = Store.from_config(store)
                self.store.recover()
                self.store.enforce_retention()
            except (StoreError, OSError, sqlite3.Error) as e:  # inspection and the PLC matter more than pictures
                self.counters["store_errors"] += 1
                self.log.error("store unavailable: events are only logged and acted on", error=str(e))
                self.store = None
            if self.store is not None:
                self.writer = SnapshotWriter(self.store, image_threshold=self.image_threshold,
                                             thumbnail_px=store.thumbnail_px)
        self.runner = build_runner(plc if plc is not None else PlcConfig(), self.store)
        self.runner.ack_poll_s = ack_poll_s
        self.runner.start()
        self._store_stats: dict[str, Any] = {}
        self._next_store_stats = 0.0

    def _camera(self, cam: str, epoch: int | None) -> CameraState:
        st = self.cams.get(cam)
        if st is None:
            st = self.cams[cam] = CameraState(self.cfg.confirm_k, self.cfg.confirm_n)
        if epoch != st.epoch:  # the capture process restarted: sequence numbers start again
            st.epoch = epoch
            st.confirm = Confirmation(self.cfg.confirm_k, self.cfg.confirm_n)
            st.last_event_seq = None
            st.last_event_id = None
            st.last_event_rank = -1
        return st

    def step(self) -> None:
        self.runner.tick()
        msg = self.receive(self.inp, 100)
        if msg is None:
            return
        self.runner.saw_result()
        cam, seq = msg["cam"], int(msg["seq"])
        amap = msg.arrays[0]
        pixel_thr = self.pixel_threshold.get(cam)
        if pixel_thr is None:
            self.counters["unknown_camera"] += 1
            return
        decision = find_regions(amap, pixel_threshold=pixel_thr, image_threshold=self.image_threshold,
                                min_area_px=self.cfg.min_area_px)
        st = self._camera(cam, msg.header.get("epoch"))
        st.inspected += 1
        confirmed = st.confirm.update(seq, decision.defect)
        t_decision = time.monotonic_ns()
        latency_ms = (t_decision - int(msg["t_mono_ns"])) / 1e6
        st.latency_ms.append(latency_ms)
        event = False
        severity: Severity | None = None
        event_id: int | None = None
        if confirmed and decision.defect:
            severity = classify(decision.regions, self.image_threshold, self.classes)
            cooldown = self.cfg.cooldown_frames
            if st.last_event_seq is None or seq - st.last_event_seq > cooldown:
                event = True
                st.events += 1
                event_id = self._event(msg.header, msg.arrays, st, decision, severity, pixel_thr, t_decision)
            elif severity.rank > st.last_event_rank and st.last_event_id is not None:
                if self._acknowledged(st.last_event_id):  # acknowledged, then it grew: a new event
                    event = True
                    st.events += 1
                    event_id = self._event(msg.header, msg.arrays, st, decision, severity, pixel_thr, t_decision)
                else:
                    self._escalate(msg.header, st, decision, severity, t_decision)
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
        if severity is not None:
            record["severity"] = severity.name
            record["action"] = severity.action
        if event_id is not None:
            record["event_id"] = event_id
        if "truth" in msg.header:
            record["truth"] = msg["truth"]
        self._record(record)

    # ------------------------------------------------------------------ events
    def _event(self, head: dict[str, Any], arrays: list[np.ndarray], st: CameraState, decision: FrameDecision,
               severity: Severity, pixel_thr: float, t_decision: int) -> int:
        cam, seq = head["cam"], int(head["seq"])
        t_capture = int(head["t_mono_ns"])
        t_wall = int(head["t_wall_ns"])
        regions = [r.to_dict() for r in decision.regions[:50]]
        record: dict[str, Any] = {
            "event_id": None,
            "camera": cam,
            "time": iso_utc(t_wall),
            "t_wall_ns": t_wall,
            "seq": seq,
            "epoch": head.get("epoch"),
            "severity": severity.name,
            "action": severity.action,
            "image_score": round(float(head["image_score"]), 6),
            "regions": regions,
            "n_regions": len(decision.regions),
            "thresholds": {"image": self.image_threshold, "pixel": pixel_thr, "min_area_px": self.cfg.min_area_px,
                           "confirm_k": self.cfg.confirm_k, "confirm_n": self.cfg.confirm_n,
                           "cooldown_frames": self.cfg.cooldown_frames},
            "model": self.model,
            "latency_ms": {"capture_to_decision": round((t_decision - t_capture) / 1e6, 2)},
            "frame_shape": list(arrays[1].shape),
            "actions": [],
        }
        if "truth" in head:
            record["truth"] = head["truth"]
        max_area = max((r.area for r in decision.regions), default=0)
        event_id: int
        stored = False
        if self.store is not None:
            try:
                event_id = self.store.add_event(record, camera=cam, t_wall_ns=t_wall, seq=seq, severity=severity.name,
                                                action=severity.action, image_score=float(head["image_score"]),
                                                max_area_px=max_area)
                stored = True
            except StoreError:
                self.counters["store_errors"] += 1
                event_id = self.runner.local_event_id()
        else:
            event_id = self.runner.local_event_id()
        record["event_id"] = event_id
        if severity.action in ("stop", "alarm"):  # the row is committed: now act
            self.runner.submit(Job("event", severity.action, cam, event_id=event_id, env=event_env(record),
                                   t_capture_mono_ns=t_capture, t_decision_mono_ns=t_decision))
        st.last_event_id = event_id
        st.last_event_rank = severity.rank
        self.log.warning("defect event", event_id=event_id, cam=cam, seq=seq, severity=severity.name,
                         action=severity.action, score=record["image_score"], regions=regions[:5],
                         decision_ms=record["latency_ms"]["capture_to_decision"])
        if stored and self.writer is not None:
            self.writer.submit(Snapshot(event_id, dict(head), arrays[0], arrays[1], decision, severity, pixel_thr))
            self._next_store_stats = 0.0
        return event_id

    def _acknowledged(self, event_id: int) -> bool:
        if self.store is None or event_id <= 0:
            return False
        try:
            return self.store.is_acknowledged(event_id)
        except sqlite3.Error:
            return False

    def _escalate(self, head: dict[str, Any], st: CameraState, decision: FrameDecision, severity: Severity,
                  t_decision: int) -> None:
        assert st.last_event_id is not None
        st.escalations += 1
        st.last_event_rank = severity.rank
        event_id = st.last_event_id
        self.log.warning("defect event escalated", event_id=event_id, cam=head["cam"], seq=head["seq"],
                         severity=severity.name, action=severity.action)
        patch = {"escalated": {"seq": int(head["seq"]), "severity": severity.name, "action": severity.action,
                               "regions": [r.to_dict() for r in decision.regions[:10]]}}
        record = {"event_id": event_id, "camera": head["cam"], "time": iso_utc(int(head["t_wall_ns"])),
                  "t_wall_ns": int(head["t_wall_ns"]), "seq": int(head["seq"]), "severity": severity.name,
                  "action": severity.action, "image_score": float(head["image_score"]),
                  "regions": patch["escalated"]["regions"]}
        if self.store is not None and event_id > 0:
            self.store.update_record(event_id, patch, severity=severity.name, action=severity.action,
                                     action_state="pending" if RANK[severity.action] >= RANK["alarm"] else "none")
        if severity.action in ("stop", "alarm"):
            self.runner.submit(Job("event", severity.action, head["cam"], event_id=event_id, env=event_env(record),
                                   t_capture_mono_ns=int(head["t_mono_ns"]), t_decision_mono_ns=t_decision))

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, record: dict[str, Any]) -> None:
        if record["event"]:  # logged in _event with its id and severity
            pass
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
                "escalations": st.escalations,
                "latency_ms": percentiles(list(st.latency_ms)),
            }
            for cam, st in self.cams.items()
        }
        s["actions"] = self.runner.stats()
        now = time.monotonic()
        if self.store is not None and now >= self._next_store_stats:
            self._next_store_stats = now + STORE_STATS_EVERY_S
            self._store_stats = self.store.stats()
        if self.store is not None and self.writer is not None:
            s["store"] = {**self._store_stats, **self.writer.counters, "backlog": self.writer.backlog()}
        return s

    def on_stop(self) -> None:
        self.runner.stop(flush_s=1.0)
        if self.writer is not None:
            self.writer.stop(timeout=2.0)
        if self.store is not None:
            self.store.close()
        if self.decisions is not None:
            self.decisions.close()


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return AlertStage(**kwargs).run()
