"""Alert stage: per-frame decisions, defects tracked on the fabric, severity, events, actions, pictures.

Every result gets a decision (logged at debug level, defects at info; optionally appended to a
JSON-lines decisions file as an audit trail, with the frame's tracks). The frame's defect regions go
to the camera's tracker (:mod:`knitwatch.pipeline.decision.tracking`), which places them on the fabric
tube by the result's ``pos`` header (frame coordinates without one): one physical defect is one track
and one *event*, confirmed k of n per track. A new confirmed defect becomes an event, logged at
warning level: its severity class (by region area and score) picks the action (``stop`` | ``alarm`` |
``log``); the event's row is committed to the store, the action is handed to the action runner (a
worker thread: PLC writes, retries, latch, heartbeat - never blocking this loop), and then the
pictures are written (frame, overlay, mask, thumbnail, JSON record). While the defect stays in view
its event is updated: a higher severity *escalates* it (alarm -> stop), a higher peak replaces its
pictures (the best frame), and a defect back at its tube place in a later revolution counts a
revolution of the same event (``recurrence_stop_revolutions`` in a row: stop). A failing store (disk
full ...) is counted and logged; inspection and actions go on without it.
"""

from __future__ import annotations

import collections
import json
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, InferenceConfig, PlcConfig, StoreConfig
from knitwatch.pipeline.actions import Job, build_runner, event_env
from knitwatch.pipeline.actions.latch import latch_dir_of
from knitwatch.pipeline.actions.rolls import RollKeeper
from knitwatch.pipeline.decision.frame import decide_frame, decision_record, severity_classes, tracker_config
from knitwatch.pipeline.decision.regions import FrameDecision, Region
from knitwatch.pipeline.decision.severity import RANK, Severity
from knitwatch.pipeline.decision.tracking import (
    FramePosition,
    Track,
    TrackDecision,
    Tracker,
    TrackerConfig,
    parse_position,
)
from knitwatch.pipeline.modelswitch import ModelSelection, model_info
from knitwatch.pipeline.overlay import region_mask, render_overlay, thumbnail
from knitwatch.pipeline.recording import DaemonRecorder
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

    def submit(self, snap: Snapshot, *, update: bool = False) -> bool:
        """Queue an event's pictures; False when the queue is full: a new event's row is then flagged
        ``files_missing``, an ``update`` (a better picture of an event that has some) is left to the caller."""
        try:
            self._q.put_nowait(snap)
            return True
        except queue.Full:
            if update:
                return False
            self.counters["snapshots_dropped"] += 1
            self.store.mark_files_missing(snap.event_id, "snapshot queue full (disk too slow?)")
            return False

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
    def __init__(self, tracking: TrackerConfig) -> None:
        self.tracking = tracking
        self.tracker = Tracker(tracking)
        self.model_id: str | None = None  # the model whose results this camera's tracks come from
        self.epoch: int | None = None
        self.inspected = 0
        self.defect_frames = 0
        self.events = 0
        self.escalations = 0
        self.position: Counter[str] = Counter()  # frames by their fabric position: ok | missing | not_ok | bad
        self.position_source = ""
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=1000)

    def restart(self) -> None:
        """The capture process restarted: sequence numbers start again, so do the tracks."""
        self.tracker = Tracker(self.tracking)


class AlertStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, results_endpoint: str, thresholds: dict,
                 alert: AlertConfig, cameras: list[CameraConfig], plc: PlcConfig | None = None,
                 store: StoreConfig | None = None, model: dict | None = None, ack_poll_s: float = 0.5,
                 inference: InferenceConfig | None = None, selection: str | None = None,
                 library: str | None = None) -> None:
        """``plc``: the ``[plc]`` section (its defaults when None); ``store``: None runs without a store;
        ``inference``: the keys securing a tcp:// results endpoint; ``thresholds``/``model``: the daemon's
        checkpoint's; ``selection``: the model library's selection (other models per camera, each result
        judged with its own model's thresholds); ``library``: the model library, whose recording requests
        this stage carries out (pipeline/recording.py)."""
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.PULL, results_endpoint, bind=True, hwm=4, inference=inference)
        self.cfg = alert
        self.classes = severity_classes(alert)
        def first_set(*values: float | None) -> float:  # an override of 0.0 is still an override
            return float(next(v for v in values if v is not None))

        self._first_set = first_set
        self.image_threshold = first_set(alert.image_threshold, thresholds["image"])
        self.camera_pixel = {c.id: c.pixel_threshold for c in cameras}
        self.cams: dict[str, CameraState] = {}
        self.decisions = Path(alert.decisions_log).open("a", encoding="utf-8") if alert.decisions_log else None
        self.model = dict(model or {})
        self.models = ModelSelection(selection, {**self.model, "id": self.model.get("id") or "default",
                                                 "thresholds": thresholds, "preprocess": {}})
        self.recorder = DaemonRecorder(library, [c.id for c in cameras])
        self.store: Store | None = None
        self.writer: SnapshotWriter | None = None
        if store is not None:
            # an index that cannot be opened (corrupt, read-only, full) leaves the store unusable, not absent: the
            # latch is in the latch file, events are held in memory and written when the store works again
            self.store = Store.from_config(store, degraded_ok=True)
            if self.store.usable:
                try:
                    self.store.recover()
                    self.store.enforce_retention()
                except (StoreError, OSError, sqlite3.Error) as e:  # inspection and the PLC matter more than pictures
                    self.counters["store_errors"] += 1
                    self.log.error("store repair at start failed: inspection and actions go on", error=str(e))
            else:
                self.counters["store_errors"] += 1
            self.writer = SnapshotWriter(self.store, image_threshold=self.image_threshold,
                                         thumbnail_px=store.thumbnail_px)
        self.runner = build_runner(plc if plc is not None else PlcConfig(), self.store,
                                   latch_dir_of(store) if store is not None else None)
        self.runner.ack_poll_s = ack_poll_s
        self.runner.start()
        # rolls: the doff signal, new rolls' start positions (a thread; pipeline/actions/rolls.py)
        self.rolls = (RollKeeper(self.store, plc if plc is not None else PlcConfig(), [c.id for c in cameras],
                                 poll_s=ack_poll_s).start() if self.store is not None else None)
        self._store_stats: dict[str, Any] = {}
        self._next_store_stats = 0.0
        self._better_pictures: dict[int, Snapshot] = {}  # event id -> its best frame, waiting for room in the writer
        self.tracking = tracker_config(alert, self.image_threshold)  # the decision layer's settings, all from [alert]

    def _camera(self, cam: str, epoch: int | None) -> CameraState:
        st = self.cams.get(cam)
        if st is None:
            st = self.cams[cam] = CameraState(self.tracking)
        if epoch != st.epoch:  # the capture process restarted: sequence numbers start again
            st.epoch = epoch
            st.restart()
        return st

    def _model(self, cam: str, st: CameraState, tag: object) -> tuple[dict[str, Any], float, float]:
        """The model that made this result (its ``model`` tag), and its image and pixel thresholds for the
        camera ([alert] and the camera's overrides first). A camera whose model changed starts new tracks
        with the new model's thresholds."""
        mid = tag if isinstance(tag, str) else self.models.default["id"]
        m = self.models.find(mid)
        if m is None:
            self.models.poll(force=True)
            m = self.models.find(mid)
        if m is None:  # a tag nobody selected (a worker of another configuration): judged by the default
            self.counters["unknown_model"] += 1
            m = self.models.default
        thr = m["thresholds"]
        image = self._first_set(self.cfg.image_threshold, thr["image"])
        pixel = self._first_set(self.camera_pixel.get(cam), self.cfg.pixel_threshold, thr.get("pixel"), thr["image"])
        if st.model_id != m["id"]:
            if st.model_id is not None:
                self.log.info("camera judged by another model from this frame on: its tracks start anew", camera=cam,
                              previous=st.model_id, model=m["id"], image_threshold=image, pixel_threshold=pixel)
                self.counters["model_changes"] += 1
            st.model_id = m["id"]
            st.tracking = tracker_config(self.cfg, image)
            st.restart()
        return m, image, pixel

    def _position(self, st: CameraState, value: object) -> FramePosition | None:
        pos, how = parse_position(value)
        st.position[how] += 1
        if pos is not None:
            st.position_source = pos.source
        elif how == "bad" and st.position["bad"] == 1:
            self.log.warning("malformed fabric position in a result: tracking in frame coordinates", pos=str(value))
        return pos

    def step(self) -> None:
        self.runner.tick()
        self.models.poll()
        self.recorder.poll()
        msg = self.receive(self.inp, 100, expect=("result",))  # checked by its schema (wire)
        if msg is None:
            return
        self.runner.saw_result()
        cam, seq = msg["cam"], int(msg["seq"])
        amap = msg.arrays[0]
        if cam not in self.camera_pixel:
            self.counters["unknown_camera"] += 1
            return
        st = self._camera(cam, msg.header.get("epoch"))
        model, image_thr, pixel_thr = self._model(cam, st, msg.header.get("model"))
        st.inspected += 1
        pos = self._position(st, msg.header.get("pos"))
        if self.rolls is not None:
            self.rolls.saw(cam, pos)
        outcome = decide_frame(st.tracker, amap, seq=seq, pos=pos, pixel_threshold=pixel_thr,  # shared with the replay
                               image_threshold=image_thr, min_area_px=self.cfg.min_area_px,
                               acknowledged=self._acknowledged)
        decision, frame = outcome.decision, outcome.tracks
        t_decision = time.monotonic_ns()
        latency_ms = (t_decision - int(msg["t_mono_ns"])) / 1e6
        st.latency_ms.append(latency_ms)
        new_events: list[int] = []
        for d in frame.decisions:
            part = _part(decision, d.regions)
            if d.new_event:
                st.events += 1
                new_events.append(self._event(msg.header, msg.arrays, st, part, d, pixel_thr, t_decision,
                                              model=model, image_thr=image_thr))
            elif d.escalated or d.recurrence or d.best:
                self._update_event(msg.header, msg.arrays, st, part, d, pixel_thr, t_decision)
        for t in frame.closed:
            self._track_closed(t)
        self._flush_pictures()
        if decision.defect:
            st.defect_frames += 1
        self.counters["inspected"] += 1
        record = decision_record(cam, seq, float(msg["image_score"]), outcome, pos=pos, new_events=new_events,
                                 latency_ms=latency_ms, truth=msg["truth"] if "truth" in msg.header else None)
        record["model"] = model["id"]
        record["t_wall_ns"] = int(msg["t_wall_ns"])  # the frame's capture time
        self._record(record)
        self.recorder.frame(cam, msg.arrays[1], seq=seq, pos=msg.header.get("pos"), t_wall_ns=int(msg["t_wall_ns"]),
                            flagged=decision.defect, model_article=model.get("article"))

    # ------------------------------------------------------------------ events
    def _event(self, head: dict[str, Any], arrays: list[np.ndarray], st: CameraState, decision: FrameDecision,
               d: TrackDecision, pixel_thr: float, t_decision: int, *, model: dict[str, Any],
               image_thr: float) -> int:
        """A new defect: commit its event, then hand its action on, then queue its pictures; binds the id."""
        cam, seq = head["cam"], int(head["seq"])
        severity = d.event.severity
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
            "thresholds": {"image": image_thr, "pixel": pixel_thr, "min_area_px": self.cfg.min_area_px,
                           "confirm_k": self.cfg.confirm_k, "confirm_n": self.cfg.confirm_n,
                           "cooldown_frames": self.cfg.cooldown_frames, "track_gate_px": self.cfg.track_gate_px,
                           "track_gate_frame_px": self.cfg.track_gate_frame_px,
                           "recurrence_stop_revolutions": self.cfg.recurrence_stop_revolutions},
            "model": model_info(model),
            "latency_ms": {"capture_to_decision": round((t_decision - t_capture) / 1e6, 2)},
            "frame_shape": list(arrays[1].shape),
            "track": _track_record(d.track),
            "actions": [],
        }
        if d.track.tube is not None:
            record["recurrence"] = d.event.recurrence()
        if d.event.previous_event_id is not None:  # back after its acknowledge
            record["previous_event_id"] = d.event.previous_event_id
        if "truth" in head:
            record["truth"] = head["truth"]
        max_area = max((r.area for r in decision.regions), default=0)
        event_id: int
        stored = held = False
        if self.store is not None:
            try:
                event_id = self.store.add_event(record, camera=cam, t_wall_ns=t_wall, seq=seq, severity=severity.name,
                                                action=severity.action, image_score=float(head["image_score"]),
                                                max_area_px=max_area)
                stored = True
            except StoreError:
                self.counters["store_errors"] += 1
                event_id = self.runner.local_event_id()
                held = True
        else:
            event_id = self.runner.local_event_id()
        record["event_id"] = event_id
        d.event.event_id = event_id
        if held:  # kept in memory, written with its pictures when the store works again
            snap = Snapshot(event_id, dict(head), arrays[0], arrays[1], decision, severity, pixel_thr)
            self.runner.hold_event(record, {"camera": cam, "t_wall_ns": t_wall, "seq": seq, "severity": severity.name,
                                            "action": severity.action, "image_score": float(head["image_score"]),
                                            "max_area_px": max_area}, on_stored=self._stored_later(d.event, snap))
        if severity.action in ("stop", "alarm"):  # the row is committed: now act
            self.runner.submit(Job("event", severity.action, cam, event_id=event_id, env=event_env(record),
                                   t_capture_mono_ns=t_capture, t_decision_mono_ns=t_decision))
        self.log.warning("defect event", event_id=event_id, cam=cam, seq=seq, severity=severity.name,
                         action=severity.action, score=record["image_score"], regions=regions[:5],
                         track=d.track.id, tube_x=record["track"]["tube_x"], revolutions=d.event.revolutions,
                         decision_ms=record["latency_ms"]["capture_to_decision"])
        if stored and self.writer is not None:
            self.writer.submit(Snapshot(event_id, dict(head), arrays[0], arrays[1], decision, severity, pixel_thr))
            self._next_store_stats = 0.0
        return event_id

    def _stored_later(self, event: Any, snap: Snapshot) -> Callable[[int], None]:  # noqa: ANN401
        """What to do when a held event was written (in the action runner's thread): its id, its pictures."""
        def stored(new_id: int) -> None:
            event.event_id = new_id
            snap.event_id = new_id
            if self.writer is not None:
                self.writer.submit(snap)
        return stored

    def _acknowledged(self, event_id: int) -> bool:
        if self.store is None or event_id <= 0:
            return False
        try:
            return self.store.is_acknowledged(event_id)
        except (sqlite3.Error, StoreError):
            return False

    def _update_event(self, head: dict[str, Any], arrays: list[np.ndarray], st: CameraState,
                      decision: FrameDecision, d: TrackDecision, pixel_thr: float, t_decision: int) -> None:
        """The tracked defect's event changed: escalated, back in a new revolution, or a better picture.
        One record update (the store), then the action (the runner), then the picture (the writer)."""
        ev = d.event
        event_id = ev.event_id
        if event_id is None:  # never bound (cannot happen: events are bound as they are made)
            return
        cam, seq = head["cam"], int(head["seq"])
        regions = [r.to_dict() for r in decision.regions[:10]]
        patch: dict[str, Any] = {}
        columns: dict[str, Any] = {}
        if d.escalated:
            st.escalations += 1
            patch["escalated"] = {"seq": seq, "severity": ev.severity.name, "action": ev.severity.action,
                                  "regions": regions}
            columns.update(severity=ev.severity.name, action=ev.severity.action,
                           action_state="pending" if RANK[ev.severity.action] >= RANK["alarm"] else "none")
            self.log.warning("defect event escalated", event_id=event_id, cam=cam, seq=seq,
                             severity=ev.severity.name, action=ev.severity.action, track=d.track.id,
                             revolutions=ev.revolutions)
        if d.recurrence:
            patch["recurrence"] = {**ev.recurrence(), "last_seq": seq}
            if not d.escalated:
                self.log.warning("recurring defect seen again", event_id=event_id, cam=cam, seq=seq,
                                 revolutions=ev.revolutions, streak=ev.streak, track=d.track.id)
        if d.best:
            patch["best"] = {"seq": seq, "peak": round(ev.best_peak, 5), "regions": regions}
            columns["max_area_px"] = ev.max_area
        if self.store is not None and event_id > 0:
            patch["track"] = {**_track_record(d.track), "max_area_px": ev.max_area,
                              "peak": round(ev.best_peak, 5), "best_seq": ev.best_seq, "frames_seen": ev.frames_seen}
            self.store.update_record(event_id, patch, **columns)
        if d.escalated and ev.severity.action in ("stop", "alarm"):
            record = {"event_id": event_id, "camera": cam, "time": iso_utc(int(head["t_wall_ns"])),
                      "t_wall_ns": int(head["t_wall_ns"]), "seq": seq, "severity": ev.severity.name,
                      "action": ev.severity.action, "image_score": float(head["image_score"]), "regions": regions}
            self.runner.submit(Job("event", ev.severity.action, cam, event_id=event_id, env=event_env(record),
                                   t_capture_mono_ns=int(head["t_mono_ns"]), t_decision_mono_ns=t_decision))
        if d.best and self.writer is not None and event_id > 0:  # the frame with the highest peak
            self._better_pictures[event_id] = Snapshot(event_id, dict(head), arrays[0], arrays[1], decision,
                                                       ev.severity, pixel_thr)

    def _flush_pictures(self) -> None:
        """Hand the waiting better pictures to the writer while it has room (never waits)."""
        if self.writer is None:
            self._better_pictures.clear()
            return
        for event_id in list(self._better_pictures):
            if not self.writer.submit(self._better_pictures[event_id], update=True):
                break
            del self._better_pictures[event_id]
            self.writer.counters["pictures_replaced"] += 1

    def _track_closed(self, t: Track) -> None:
        """A tracked defect left the view (or was lost): its event's final numbers."""
        ev = t.event
        if ev is None or ev.event_id is None or ev.event_id <= 0 or self.store is None:
            return
        self.store.update_record(ev.event_id, {"track": {**_track_record(t), "max_area_px": ev.max_area,
                                                         "peak": round(ev.best_peak, 5), "best_seq": ev.best_seq,
                                                         "frames_seen": ev.frames_seen, "closed": True}},
                                 max_area_px=ev.max_area)

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
                **st.tracker.stats(),
                "position": {"source": st.position_source or "none", **st.position},
                "latency_ms": percentiles(list(st.latency_ms)),
            }
            for cam, st in self.cams.items()
        }
        for cam, st in self.cams.items():
            s["cameras"][cam]["model"] = st.model_id
        s["recording"] = self.recorder.stats()
        s["actions"] = self.runner.stats()
        if self.rolls is not None:
            s["rolls"] = self.rolls.stats()
        now = time.monotonic()
        if self.store is not None and now >= self._next_store_stats:
            self._next_store_stats = now + STORE_STATS_EVERY_S
            self._store_stats = self.store.stats()
        if self.store is not None and self.writer is not None:
            s["store"] = {**self._store_stats, **self.writer.counters, "backlog": self.writer.backlog()}
        return s

    def on_stop(self) -> None:
        self.recorder.stop()
        self.runner.stop(flush_s=1.0)
        if self.rolls is not None:
            self.rolls.stop()
        if self.writer is not None:
            self.writer.stop(timeout=2.0)
        if self.store is not None:
            self.store.close()
        if self.decisions is not None:
            self.decisions.close()


def _part(decision: FrameDecision, regions: list[Region]) -> FrameDecision:
    """The part of a frame's decision that is one tracked defect: its regions and their mask."""
    mask = None
    if decision.mask is not None and regions:
        mask = np.zeros_like(decision.mask)
        for r in regions:
            x0, y0, x1, y1 = r.bbox
            mask[y0:y1, x0:x1] = decision.mask[y0:y1, x0:x1]
    return FrameDecision(bool(regions), list(regions), mask)


def _track_record(t: Track) -> dict[str, Any]:
    """A track's place for an event's record: tube column and width (None without a position), revolution."""
    return {"id": t.id, "first_seq": t.first_seq, "last_seq": t.last_seq,
            "tube_x": round(t.tube[0], 1) if t.tube else None, "tube_width": round(t.tube[1], 1) if t.tube else None,
            "revolution": t.pass_, "circumference_px": t.circ}


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return AlertStage(**kwargs).run()
