"""What every action driver offers, and the unit of work the action runner retries: a job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class ActionError(Exception):
    """An action could not be done or not be confirmed (PLC unreachable, refused, read-back differs ...)."""


@dataclass
class Job:
    """One thing to confirm: an event's action (``stop``/``alarm``) or an acknowledge (``ack``)."""

    kind: str  # "event" | "ack"
    action: str  # "stop" | "alarm" | "ack"
    camera: str | None
    event_id: int | None = None
    ack_id: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # KNITWATCH_* fields for the command driver
    t_capture_mono_ns: int | None = None
    t_decision_mono_ns: int = field(default_factory=time.monotonic_ns)
    covers_event_id: int | None = None  # acks from the store: the newest event id they acknowledge
    covers_seq: int | None = None  # acks from the mailbox: the newest latch sequence number they acknowledge
    ack_token: str | None = None  # acks: their name in the latch file (the mailbox's token, "store-<id>")
    requested_ns: int | None = None  # acks: when they were asked for (wall clock)
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    restored: bool = False  # re-submitted at start-up (the previous process could not confirm it)


def event_env(record: dict[str, Any]) -> dict[str, str]:
    """The ``KNITWATCH_*`` variables of an event (its JSON record) for the command driver."""
    regions = record.get("regions") or []
    top = max(regions, key=lambda r: r.get("area", 0)) if regions else {}
    env = {
        "KNITWATCH_ACTION": str(record.get("action", "")),
        "KNITWATCH_EVENT_ID": str(record.get("event_id", "")),
        "KNITWATCH_CAMERA": str(record.get("camera", "")),
        "KNITWATCH_SEVERITY": str(record.get("severity", "")),
        "KNITWATCH_SCORE": f"{float(record.get('image_score', 0.0)):.5f}",
        "KNITWATCH_SEQ": str(record.get("seq", "")),
        "KNITWATCH_TIME": str(record.get("time", "")),
        "KNITWATCH_T_WALL_NS": str(record.get("t_wall_ns", "")),
        "KNITWATCH_REGIONS": str(len(regions)),
        "KNITWATCH_AREA_PX": str(top.get("area", 0)),
        "KNITWATCH_PEAK": f"{max((float(r.get('peak', 0.0)) for r in regions), default=0.0):.5f}",
        "KNITWATCH_BBOX": ",".join(str(v) for v in top.get("bbox", [])),
        "KNITWATCH_EVENT_DIR": str(record.get("event_dir", "")),
    }
    return env


class Driver:
    """Base driver: no outputs, nothing to notify. PLC drivers set ``has_outputs``; they write the stop
    (and alarm) outputs to the latch state and read them back; ``notify`` runs per job."""

    name = "base"
    has_outputs = False
    has_heartbeat = False

    def connect(self) -> None:
        """Open the connection if it is not open; ActionError when that fails."""

    def close(self) -> None:
        """Drop the connection (the next ``connect`` opens a new one)."""

    def shutdown(self) -> None:
        """Release everything (end of the process)."""
        self.close()

    def set_outputs(self, stop: bool, alarm: bool) -> dict[str, Any]:
        """Write the outputs and confirm them by reading back; ActionError otherwise."""
        return {}

    def read_outputs(self) -> tuple[bool, bool]:
        """The outputs as the PLC holds them now (stop, alarm)."""
        return (False, False)

    def heartbeat(self, counter: int) -> None:
        """Write the heartbeat (coils toggle: ``counter % 2``; registers count)."""

    def notify(self, job: Job) -> dict[str, Any]:
        """Per-job work (run a program, log); its result lands in the event's record."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name}


class LogDriver(Driver):
    """Does nothing but log the event: for trials and for cameras that only record."""

    name = "log"

    def notify(self, job: Job) -> dict[str, Any]:
        log.warning("action (log driver: nothing is switched)", action=job.action, camera=job.camera,
                    event_id=job.event_id, ack_id=job.ack_id)
        return {}


class BrokenDriver(Driver):
    """Stands in for a driver that cannot even be built (missing optional package ...): every attempt
    fails loudly with the reason, inspection and recording go on."""

    has_outputs = True

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def connect(self) -> None:
        raise ActionError(self.reason)
