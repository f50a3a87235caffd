"""One frame's decision for one camera: regions -> tracks -> events, and its decisions-log record.

The one code path of the per-frame decision, shared by the live alert stage
(:mod:`knitwatch.pipeline.stages.alert`) and the replay of a recorded stream of model outputs
(``knitwatch bench detection --replay``): :func:`decide_frame` finds the frame's defect regions in its
stitched anomaly map (:func:`~knitwatch.pipeline.decision.regions.find_regions`) and hands them with the
frame's fabric position to the camera's :class:`~knitwatch.pipeline.decision.tracking.Tracker`
(confirmation per track, events, escalation, recurrence, severity); :func:`decision_record` is the
frame's line in the decisions log (what ``bench detection`` reads). What the caller does with a new
event (the stage: store, PLC action, pictures; the replay: a counter) is its own business - it binds
the event's id (:attr:`EventState.event_id`) before it makes the record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knitwatch.config.settings import AlertConfig
from knitwatch.pipeline.decision.regions import FrameDecision, Region, find_regions
from knitwatch.pipeline.decision.severity import Severity, SeverityClass
from knitwatch.pipeline.decision.tracking import (
    FramePosition,
    FrameTracks,
    Track,
    TrackDecision,
    Tracker,
    TrackerConfig,
)


def severity_classes(alert: AlertConfig) -> list[SeverityClass]:
    """The ``[alert]`` section's severity classes, in their configured order."""
    return [SeverityClass.from_dict(c.model_dump()) for c in alert.severity]


def tracker_config(alert: AlertConfig, image_threshold: float) -> TrackerConfig:
    """The tracker's settings from the ``[alert]`` section (every value from there)."""
    return TrackerConfig(
        confirm_k=alert.confirm_k, confirm_n=alert.confirm_n, gate_px=alert.track_gate_px,
        frame_gate_px=alert.track_gate_frame_px, lost_frames=alert.cooldown_frames,
        recurrence_stop_revolutions=alert.recurrence_stop_revolutions,
        recurrence_memory_revolutions=alert.recurrence_memory_revolutions,
        image_threshold=image_threshold, classes=severity_classes(alert), cutline_factor=alert.cutline_factor,
        cutline_margin_px=alert.cutline_margin_px, cutline_memory_revolutions=alert.cutline_memory_revolutions)


@dataclass
class FrameOutcome:
    """What the decision layer made of one frame."""

    decision: FrameDecision  # the frame's defect regions (and their mask)
    tracks: FrameTracks  # tracks seen, per confirmed track its decision (new event, escalation ...), tracks closed


def decide_frame(tracker: Tracker, amap: np.ndarray, *, seq: int, pos: FramePosition | None, pixel_threshold: float,
                 image_threshold: float, min_area_px: int,
                 acknowledged: Callable[[int], bool] = lambda _event_id: False) -> FrameOutcome:
    """The decision for frame ``seq`` of one camera: its regions in the stitched anomaly map ``amap``
    (frame pixels), placed on the fabric by ``pos`` and tracked by the camera's ``tracker``. Regions on
    the cutline below its learned level are normal fabric (`knitwatch.pipeline.decision.cutline`)."""
    cut = tracker.cutline
    normal = None
    if pos is not None and pos.cutline_px is not None and cut.factor > 0:
        def normal(r: Region) -> bool:
            return (cut.at_cutline(r, pos.offset_px, pos.circumference_px, pos.cutline_px)
                    and cut.normal(r, pos.pass_of(0.5 * (r.bbox[0] + r.bbox[2])), image_threshold))
    decision = find_regions(amap, pixel_threshold=pixel_threshold, image_threshold=image_threshold,
                            min_area_px=min_area_px, normal=normal)
    frame = tracker.update(seq, decision.regions, width=int(amap.shape[-1]), pos=pos, acknowledged=acknowledged)
    return FrameOutcome(decision, frame)


def top_severity(decisions: Sequence[TrackDecision]) -> Severity | None:
    """The most severe confirmed defect of a frame (None: none confirmed)."""
    top: Severity | None = None
    for d in decisions:
        if top is None or d.event.severity.rank > top.rank:
            top = d.event.severity
    return top


def decision_record(cam: str, seq: int, score: float, outcome: FrameOutcome, *, pos: FramePosition | None,
                    new_events: Sequence[int], latency_ms: float | None, truth: Any = None) -> dict[str, Any]:  # noqa: ANN401
    """The frame's line in the decisions log; ``new_events``: the ids bound to the frame's new events;
    ``truth``: the simulator's, when the frame has one."""
    decision, frame = outcome.decision, outcome.tracks
    record: dict[str, Any] = {
        "cam": cam,
        "seq": seq,
        "score": round(float(score), 5),
        "defect": decision.defect,
        "confirmed": any(t.confirmed for t in frame.seen),  # the frame shows a confirmed defect
        "event": bool(new_events),
        "regions": [r.to_dict() for r in decision.regions[:10]],
        "tracks": [track_view(t, frame.decisions) for t in frame.seen[:20]],
    }
    if latency_ms is not None:
        record["latency_ms"] = round(latency_ms, 2)
    if pos is not None:
        record["pos"] = {"rev": pos.rev, "offset_px": round(pos.offset_px, 2),
                         "circumference_px": pos.circumference_px, "source": pos.source}
    top = top_severity(frame.decisions)
    if top is not None:
        record["severity"] = top.name
        record["action"] = top.action
    if new_events:
        record["event_id"] = new_events[0]
        record["event_ids"] = list(new_events)
    if truth is not None:
        record["truth"] = truth
    return record


def track_view(t: Track, decisions: Sequence[TrackDecision]) -> dict[str, Any]:
    """A track seen in a frame, for the decisions log (what the detection benchmark reads)."""
    view: dict[str, Any] = {"id": t.id, "bbox": list(union_box(t)), "area": t.area, "peak": round(t.peak, 5),
                            "confirmed": t.confirmed, "tube_x": round(t.tube[0], 1) if t.tube else None,
                            "revolution": t.pass_}
    d = next((d for d in decisions if d.track is t), None)
    if d is not None:
        view.update(event_id=d.event.event_id, severity=d.event.severity.name, action=d.event.severity.action,
                    new_event=d.new_event, escalated=d.escalated, revolutions=d.event.revolutions)
    return view


def union_box(t: Track) -> tuple[int, int, int, int]:
    """The box around a track's regions in this frame (its last box when it has none)."""
    b = [r.bbox for r in t.regions] or [t.box]
    return min(x[0] for x in b), min(x[1] for x in b), max(x[2] for x in b), max(x[3] for x in b)
