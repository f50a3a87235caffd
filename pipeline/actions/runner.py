"""The action runner: a worker thread inside the alert process that owns the latch and the driver.

The alert stage only *submits* (a queue put, never blocking); the thread

- keeps the **latch**: per camera the unacknowledged stop / alarm events. The stop output is on
  while any camera has a latched stop, the alarm output while any stop or alarm is latched;
- keeps the latch where a broken store cannot lose it: the **latch file** (``latch.json`` in the
  latch folder, :mod:`knitwatch.pipeline.actions.latch`) is written atomically on every change (an
  acknowledge is on disk before the stop output is reset), and at start-up the latch is the latch
  file's, plus the store's unacknowledged stops, plus - read back from the PLC before anything is
  written - a stop output the PLC holds without a recorded acknowledge of it: a restart never
  clears a stop. A corrupt or unreadable latch file counts as a latched stop (fail safe);
- writes the outputs and **confirms** them by reading them back; what cannot be confirmed is retried
  with exponential back-off (``retry_initial_s`` doubling up to ``retry_max_s``) until it is, loudly
  (every failure is logged at error level and counted in ``stats()``); a new stop is tried at once;
- re-checks the outputs every ``heartbeat_s`` and writes them again when the PLC lost them (a PLC
  restart clears its coils: the stop lands again);
- toggles the **heartbeat** every ``heartbeat_s`` while inspection really runs: the stage's loop
  ticks, and a result arrived within ``heartbeat_idle_s``; when knitwatch dies or stalls the heartbeat
  stops and the PLC fails safe;
- polls the acknowledges every ``ack_poll_s`` - the store's, and the latch folder's mailbox (written
  by ``knitwatch ack`` when the store's index is unusable) - resets the latch they cover, cancels
  actions of acknowledged events that never landed, clears the outputs and records the handling;
- keeps the events the store could not take (**held** in memory, with negative ids) and writes them,
  and the acknowledges applied without the index, once the store works again (checked every
  :data:`STORE_RETRY_S`); ``stats()["degraded"]`` says why, while the store, the latch file or the
  PLC is in trouble;
- runs the driver's per-job work (the command driver's program) and writes every confirmed result
  with its latencies into the event's record.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, Driver, Job, event_env
from knitwatch.pipeline.actions.latch import (
    LATCH_FILE,
    UNKNOWN_CAMERA,
    LatchFile,
    LatchFileError,
    ensure_mailbox,
    take_ack_requests,
)
from knitwatch.pipeline.store.database import Store, StoreError, iso_utc

log = structlog.get_logger(__name__)

STORE_RETRY_S = 2.0  # how often an unusable store is tried again (held events, acknowledges to record)
MAX_HELD_EVENTS = 1000  # events kept in memory while the store cannot take them
MAX_HELD_PICTURES = 16  # of those, how many keep their pictures (the rest are written without)
RECENT_ACKS = 20  # acknowledges reported in the latch file (those not yet in the store: all)
LATCHING = ("stop", "alarm")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "max": round(float(arr.max()), 2)}


@dataclass
class HeldEvent:
    """An event the store could not take: kept in memory, written when the store works again."""

    local_id: int
    record: dict[str, Any]
    index: dict[str, Any]  # Store.add_event's keyword arguments
    on_stored: Callable[[int], None] | None
    held_ns: int = field(default_factory=time.time_ns)
    results: list[dict[str, Any]] = field(default_factory=list)
    action_state: str | None = None


class ActionRunner:
    def __init__(self, driver: Driver, plc: PlcConfig | None = None, *, store: Store | None = None,
                 latch_dir: Path | str | None = None, ack_poll_s: float = 0.5, queue_size: int = 1000) -> None:
        """``plc``: the ``[plc]`` section's timing (heartbeat, retries); its defaults when not given.
        ``latch_dir``: the folder of the latch file and the acknowledge mailbox (None: the latch lives in
        memory, the store and the PLC only)."""
        plc = plc if plc is not None else PlcConfig()
        self.driver = driver
        self.store = store
        self.latch_dir = Path(latch_dir) if latch_dir is not None else None
        self.latch_file = LatchFile(self.latch_dir) if self.latch_dir is not None else None
        self.heartbeat_s = plc.heartbeat_s
        self.heartbeat_idle_s = plc.heartbeat_idle_s
        self.stall_s = max(3.0 * self.heartbeat_s, 2.0)
        self.retry_initial_s = plc.retry_initial_s
        self.retry_max_s = plc.retry_max_s
        self.ack_poll_s = ack_poll_s
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        # action -> camera -> {event id: latch sequence number}; event id 0: a stop of unknown origin
        self.latch: dict[str, dict[str, dict[int, int]]] = {a: {} for a in LATCHING}
        self.latch_seq = 0
        self.pending: list[Job] = []
        self.dirty = driver.has_outputs  # the outputs follow the latch from the start
        self.outputs: tuple[bool, bool] | None = None
        self.confirmed_outputs: tuple[bool, bool] | None = None  # as last confirmed by read-back (latch file)
        self.release_pending: dict[str, Any] | None = None  # an acknowledge released the stop, reset unconfirmed
        self.plc_checked = not driver.has_outputs  # the PLC's outputs are read before the first write
        self._store_proof: dict[str, Any] | None = None
        self.connected = not driver.has_outputs
        self.failures = 0
        self.last_error = ""
        self._last_error_mono: float | None = None
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()  # other threads count under it (never while _publish copies)
        self.delay = self.retry_initial_s
        self.retry_at = 0.0
        self.urgent = True
        self.hb_counter = 0
        self.hb_paused = self.heartbeat_idle_s > 0  # until the first inspection result
        now = time.monotonic()
        self.next_hb = self.next_verify = self.next_ack_poll = now
        self.next_store_work = now
        self._tick = now
        self._last_result = float("-inf")  # the heartbeat starts with the first inspection result
        self._latency: collections.deque[float] = collections.deque(maxlen=500)
        self._local_ids = itertools.count(-1, -1)
        self._ids_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: dict[str, Any] = {}
        self._warned: dict[str, float] = {}
        # the latch file
        self.file_dirty = self.latch_file is not None
        self.release_unsaved = False
        self.file_problem = ""
        self._file_retry_at = 0.0
        self.acks_log: list[dict[str, Any]] = []  # recent acknowledges, and all not yet in the store
        # events the store could not take
        self.held: list[HeldEvent] = []
        self._held_lock = threading.Lock()
        self._publish()

    # ------------------------------------------------------------------ the stage's side (any thread)
    def start(self) -> ActionRunner:
        self._restore()
        self._save(force=True)
        if self.latch_dir is not None:
            ensure_mailbox(self.latch_dir)
        self._publish()
        self._thread = threading.Thread(target=self._run, name="knitwatch-actions", daemon=True)
        self._thread.start()
        return self

    def local_event_id(self) -> int:
        """An id for an event the store could not take (negative: every acknowledge covers it)."""
        with self._ids_lock:
            return next(self._local_ids)

    def hold_event(self, record: dict[str, Any], index: dict[str, Any],
                   on_stored: Callable[[int], None] | None = None) -> bool:
        """Keep an event the store could not take (``record["event_id"]``: its local id, from
        :meth:`local_event_id`) and write it - ``index``: :meth:`Store.add_event`'s keyword arguments -
        when the store works again; then ``on_stored(new_id)`` runs in this thread (e.g. to queue its
        pictures). Call it before submitting the event's action. False (logged) when the memory for
        held events is full: the event is then only logged (its stop latches all the same)."""
        with self._held_lock:
            if len(self.held) >= MAX_HELD_EVENTS:
                with self._counters_lock:
                    self.counters["held_dropped"] += 1
                self._warn("held_full", "too many events held in memory while the store is unusable: this one is "
                           "only logged", event_id=record.get("event_id"), held=len(self.held))
                return False
            if on_stored is not None and sum(h.on_stored is not None for h in self.held) >= MAX_HELD_PICTURES:
                on_stored = None  # its pictures are not kept: written later without them
            self.held.append(HeldEvent(int(record["event_id"]), dict(record), dict(index), on_stored))
            with self._counters_lock:
                self.counters["held"] += 1
        self.next_store_work = 0.0
        return True

    def submit(self, job: Job) -> bool:
        """Queue a job (never blocks); False (counted, logged) only if the queue is full."""
        try:
            self._q.put_nowait(job)
            return True
        except queue.Full:
            with self._counters_lock:
                self.counters["dropped"] += 1
            log.error("action queue is full: action dropped", action=job.action, camera=job.camera,
                      event_id=job.event_id)
            return False

    def acknowledge(self, by: str, camera: str | None = None, note: str = "") -> None:
        """Acknowledge in-process (with a store, it is recorded there too, as an applied acknowledge)."""
        self.submit(Job("ack", "ack", camera, env=_ack_env(None, by, camera, note), ack_token=secrets.token_hex(8)))

    def tick(self) -> None:
        """The stage's loop is alive (called every step)."""
        self._tick = time.monotonic()

    def saw_result(self) -> None:
        """An inspection result arrived (inspection runs: keep the heartbeat going)."""
        self._last_result = time.monotonic()

    def stats(self) -> dict[str, Any]:
        return dict(self._snapshot)

    def stop(self, flush_s: float = 1.0) -> None:
        """Give pending actions up to ``flush_s`` to be confirmed (only while the PLC is reachable: what
        is not confirmed is in the latch file and the store and retried at the next start), then end
        the thread (the heartbeat stops with it) and close the driver. The latch stays on the PLC, in
        the latch file and in the store."""
        deadline = time.monotonic() + flush_s
        while (time.monotonic() < deadline and self.connected
               and (self.pending or self.dirty or not self._q.empty())):
            time.sleep(0.02)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # a daemon thread: a hung PLC request does not hold the exit
        if self.pending:
            log.error("actions not confirmed at shutdown: retried at the next start",
                      pending=[(j.action, j.camera, j.event_id) for j in self.pending])
        if self.held:
            log.error("events held in memory are lost at shutdown (the store was unusable); their stops stay "
                      "latched in the latch file", events=[h.local_id for h in self.held])
        if self._thread is None or not self._thread.is_alive():
            self._save(force=True)
        with contextlib.suppress(Exception):
            self.driver.shutdown()
        self._publish()

    # ------------------------------------------------------------------ start-up
    def _restore(self) -> None:
        """The latch at start: the latch file's, the store's unacknowledged stops/alarms (less those an
        acknowledge recorded in either covers). The PLC's own outputs are read on the first contact."""
        state: dict[str, Any] | None = None
        if self.latch_file is not None:
            try:
                state = self.latch_file.read()
                if state is not None:
                    self._load(state)
            except LatchFileError as e:
                state = None
                self.file_problem = str(e)
                self.counters["latch_file_corrupt"] += 1
                self._latch_add("stop", UNKNOWN_CAMERA, 0)
                log.error("THE LATCH FILE IS UNREADABLE OR CORRUPT: the stop is latched (fail safe) until it is "
                          "acknowledged (knitwatch ack)", error=str(e))
        if self.store is not None:
            try:
                self._restore_from_store(state is not None)
            except (StoreError, sqlite3.Error) as e:
                log.error("cannot read the latch from the store's index: the latch file and the PLC's stop output "
                          "decide", error=str(e), latch_file=state is not None)
        known = [i for cams in self.latch.values() for ids in cams.values() for i in ids]
        known += [i for a in self.acks_log for i in a["released"]]
        if self.store is not None:
            self.store.raise_id_floor(max(known, default=0))
        low = min([*known, 0])
        self._local_ids = itertools.count(min(-1, low - 1), -1)  # never an id of a restored latch entry
        if any(self.latch.values()) or self.pending:
            log.warning("latch restored", stop=sorted(self.latch["stop"]), alarm=sorted(self.latch["alarm"]),
                        unconfirmed=len(self.pending), latch_file=state is not None)

    def _load(self, state: dict[str, Any]) -> None:
        try:
            for action in LATCHING:
                for cam, ids in (state.get("latch") or {}).get(action, {}).items():
                    self.latch[action][str(cam)] = {int(i): int(s) for i, s in ids.items()}
            self.latch_seq = max([int(state.get("latch_seq") or 0)]
                                 + [s for cams in self.latch.values() for ids in cams.values() for s in ids.values()])
            out = state.get("outputs")
            self.confirmed_outputs = (bool(out["stop"]), bool(out["alarm"])) if out else None
            rp = state.get("release_pending")
            self.release_pending = dict(rp) if rp else None
            self.acks_log = [dict(a) for a in state.get("acks") or [] if isinstance(a, dict)]
            for a in self.acks_log:
                a["released"] = [int(i) for i in a.get("released") or []]
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            raise LatchFileError(f"{LATCH_FILE} is corrupt (a field has a wrong type: {e})") from None

    def _restore_from_store(self, have_file: bool) -> None:
        assert self.store is not None
        if not self.store.usable:
            raise StoreError(self.store.problem)
        # entries the index holds as acknowledged: that acknowledge is proven (a latch file write was lost)
        positive = [i for cams in self.latch.values() for ids in cams.values() for i in ids if i > 0]
        acked = self.store.acknowledged_ids(positive)
        if acked:
            for cams in self.latch.values():
                for cam in list(cams):
                    for i in acked & set(cams[cam]):
                        del cams[cam][i]
                    if not cams[cam]:
                        del cams[cam]
            self.file_dirty = True
            log.warning("latch entries the store's index holds as acknowledged: released", events=sorted(acked))
        not_in_store = {i for a in self.acks_log if not a.get("in_store") for i in a["released"]}
        for e in self.store.latched_events():
            eid = int(e["id"])
            if eid in not_in_store:  # acknowledged while the index was unusable: recorded there soon
                continue
            if eid not in self.latch[e["action"]].get(e["camera"], {}):
                self._latch_add(e["action"], e["camera"], eid)
        for ev in self.store.unconfirmed_events():
            if int(ev["id"]) in self.latch.get(ev["action"], {}).get(ev["camera"], {}):
                self.pending.append(Job("event", ev["action"], ev["camera"], event_id=int(ev["id"]),
                                        env=event_env(ev.get("record", {})), restored=True))
        # the index's proof of an acknowledge whose reset did not land: without a latch file, or when the latch
        # file's last confirmed stop output was on (the runner died between the index's ack and its own record)
        if not have_file or self.confirmed_outputs is None or self.confirmed_outputs[0]:
            self._store_proof = self.store.release_unconfirmed()

    def _check_plc(self) -> None:
        """Before the first write: a stop output the PLC holds stays latched unless an acknowledge of it
        is recorded (a reset that did not land before knitwatch stopped)."""
        stop, _alarm = self.driver.read_outputs()
        self.plc_checked = True
        if not stop or self.latch["stop"]:
            return
        proof = self.release_pending or self._store_proof
        if proof:
            log.warning("the PLC still holds the stop output of an acknowledged stop (its reset was not confirmed "
                        "before the restart): resetting it", acknowledge=proof)
            return
        self._latch_add("stop", UNKNOWN_CAMERA, 0)
        self.counters["latched_from_plc"] += 1
        log.error("THE PLC HOLDS THE STOP OUTPUT and no acknowledge of it is recorded: it stays latched until "
                  "acknowledged (knitwatch ack)", **self.driver.describe())

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop_once()
            except Exception:  # the thread must live on whatever happens
                log.exception("action runner error")
                self.counters["runner_errors"] += 1
                time.sleep(0.1)
            self._publish()

    def _loop_once(self) -> None:
        try:
            item = self._q.get(timeout=self._wait_s())
            while True:
                if item is not None:
                    self._take(item)
                item = self._q.get_nowait()
        except queue.Empty:
            pass
        if self._stop.is_set():
            return
        now = time.monotonic()
        if now >= self.next_ack_poll:
            self.next_ack_poll = now + self.ack_poll_s
            if self.store is not None:
                self._poll_acks()
            self._poll_mailbox()
            self._watch_latch_file()
        if self.release_unsaved:  # an acknowledge is on disk before the stop output is reset
            self._save()
        urgent, self.urgent = self.urgent, False
        if self._work_due(now) and (urgent or now >= self.retry_at):
            self._attempt(now)
        self._save()
        self._store_work(time.monotonic())

    def _work_due(self, now: float) -> bool:
        return bool(self.pending or self.dirty or (self.driver.has_outputs and now >= self.next_verify)
                    or (self.driver.has_heartbeat and now >= self.next_hb))

    def _wait_s(self) -> float:
        now = time.monotonic()
        due = [now + 0.5, self.next_ack_poll]
        if self.urgent:
            return 0.0
        if self.pending or self.dirty:
            due.append(self.retry_at)
        if self.driver.has_heartbeat:
            due.append(max(self.next_hb, self.retry_at))
        if self.driver.has_outputs:
            due.append(max(self.next_verify, self.retry_at))
        return min(0.5, max(0.001, min(due) - now))

    def _take(self, job: Job) -> None:
        self.urgent = True
        if job.kind == "ack":
            self._apply_ack(job)
            return
        if job.action in self.latch and job.event_id is not None and job.camera is not None:
            self._latch_add(job.action, job.camera, job.event_id)
        self.pending.append(job)

    def _latch_add(self, action: str, camera: str, event_id: int) -> None:
        if self.store is not None and event_id > self.store.id_floor:
            self.store.id_floor = event_id  # a new index (the old one lost) gives ids above the latched ones
        ids = self.latch[action].setdefault(camera, {})
        if event_id not in ids:
            self.latch_seq += 1
            ids[event_id] = self.latch_seq
            self.file_dirty = True
        self.dirty = self.driver.has_outputs

    def _want(self) -> tuple[bool, bool]:
        stop = bool(self.latch["stop"])
        return stop, stop or bool(self.latch["alarm"])

    def _apply_ack(self, job: Job) -> None:
        by = job.env.get("KNITWATCH_ACK_BY", "")
        note = job.env.get("KNITWATCH_ACK_NOTE", "")
        if job.ack_token is None:
            job.ack_token = f"store-{job.ack_id}" if job.ack_id is not None else secrets.token_hex(8)

        def covered(camera: str, event_id: int, seq: int) -> bool:
            if job.camera is not None and camera != job.camera:
                return False
            if job.covers_seq is not None:
                return seq <= job.covers_seq
            return job.covers_event_id is None or event_id <= job.covers_event_id

        had_stop = bool(self.latch["stop"])
        released: set[int] = set()
        for cams in self.latch.values():
            for cam in list(cams):
                hit = {i for i, seq in cams[cam].items() if covered(cam, i, seq)}
                released |= hit
                for i in hit:
                    del cams[cam][i]
                if not cams[cam]:
                    del cams[cam]
        for p in [p for p in self.pending if p.kind == "event" and p.event_id in released]:
            self.pending.remove(p)
            self.counters["cancelled"] += 1
            log.warning("acknowledged before the action could be confirmed: cancelled", action=p.action,
                        camera=p.camera, event_id=p.event_id, ack_id=job.ack_id, attempts=p.attempts)
            self._record_event(p, {"driver": self.driver.name, "action": p.action, "confirmed": False,
                                   "cancelled_by_ack": job.ack_id or job.ack_token, "attempts": p.attempts,
                                   "errors": p.errors[-3:]}, "cancelled")
        now_ns = time.time_ns()
        if had_stop and not self.latch["stop"]:
            self.release_pending = {"ack": job.ack_token, "by": by, "at": iso_utc(now_ns)}
            self.release_unsaved = True
        self.acks_log.append({"token": job.ack_token, "ack_id": job.ack_id, "by": by, "camera": job.camera,
                              "note": note, "requested_ns": job.requested_ns or now_ns, "handled_ns": now_ns,
                              "cleared_ns": None, "released": sorted(released),
                              "in_store": job.ack_id is not None or self.store is None})  # nothing left to record
        self._trim_acks()
        self.dirty = self.driver.has_outputs
        self.file_dirty = True
        self.pending.append(job)
        self.counters["acks"] += 1
        self.urgent = True
        if any(not a["in_store"] for a in self.acks_log):
            self.next_store_work = 0.0
        log.warning("acknowledged: latch reset", by=by, camera=job.camera or "all", note=note, ack_id=job.ack_id,
                    ack=job.ack_token, released=len(released),
                    still_latched={a: sorted(c) for a, c in self.latch.items() if c})

    def _trim_acks(self) -> None:
        keep = [a for a in self.acks_log[:-RECENT_ACKS] if not a["in_store"]]
        self.acks_log = keep + self.acks_log[-RECENT_ACKS:]

    def _ack_entry(self, token: str | None) -> dict[str, Any] | None:
        return next((a for a in reversed(self.acks_log) if a["token"] == token), None)

    def _poll_acks(self) -> None:
        assert self.store is not None
        if not self.store.usable and time.monotonic() < self.next_store_work:
            return
        try:
            for ack in self.store.pending_acks():
                self.store.apply_ack(ack["id"])
                job = Job("ack", "ack", ack["camera"], ack_id=ack["id"], covers_event_id=ack["max_event_id"],
                          requested_ns=ack["requested_ns"], env=_ack_env(ack["id"], ack["by"], ack["camera"],
                                                                         ack["note"]))
                self._apply_ack(job)
        except (StoreError, sqlite3.Error) as e:
            self.counters["store_errors"] += 1
            self._warn("store_acks", "cannot read acknowledges from the store's index (the latch folder's mailbox "
                       "still takes them: knitwatch ack)", error=str(e))

    def _poll_mailbox(self) -> None:
        if self.latch_dir is None:
            return
        try:
            requests = take_ack_requests(self.latch_dir)
        except LatchFileError as e:
            self.counters["mailbox_errors"] += 1
            log.error("the acknowledge mailbox was corrupt: emptied (an acknowledge may have to be repeated)",
                      error=str(e))
            return
        except OSError as e:
            self.counters["mailbox_errors"] += 1
            self._warn("mailbox", "cannot read the acknowledge mailbox", error=str(e))
            return
        for r in requests:
            try:
                camera = r.get("camera")
                covers = r.get("covers_seq")
                if camera is not None and not isinstance(camera, str) or covers is not None and (
                        isinstance(covers, bool) or not isinstance(covers, int)):
                    raise TypeError("camera must be a string or null, covers_seq an integer or null")
                by, note, token = str(r.get("by") or "unknown")[:200], str(r.get("note") or "")[:2000], r["token"]
                if not isinstance(token, str) or not token:
                    raise TypeError("token must be a string")
                requested = int(r.get("requested_ns") or time.time_ns())
            except (KeyError, TypeError, ValueError) as e:
                self.counters["mailbox_errors"] += 1
                log.error("a malformed acknowledge request in the mailbox was dropped", error=str(e))
                continue
            log.warning("acknowledge from the latch folder's mailbox", by=by, camera=camera or "all", ack=token)
            self._apply_ack(Job("ack", "ack", camera, ack_token=token, covers_seq=covers, requested_ns=requested,
                                env=_ack_env(None, by, camera, note)))

    # ------------------------------------------------------------------ the PLC
    def _alive(self, now: float) -> bool:
        stalled = now - self._tick > self.stall_s
        idle = self.heartbeat_idle_s > 0 and now - self._last_result > self.heartbeat_idle_s
        alive = not (stalled or idle)
        if alive == self.hb_paused:
            self.hb_paused = not alive
            if alive:
                log.info("heartbeat running: inspection runs")
            else:
                log.error("heartbeat paused: inspection is not running (the PLC will fail safe)",
                          loop_stalled=stalled,
                          no_results_s=round(now - self._last_result, 1) if self._last_result > 0 else None)
        return alive

    def _attempt(self, now: float) -> None:
        for job in self.pending:
            job.attempts += 1
        try:
            self.driver.connect()
            if not self.connected:
                self.connected = True
                if self.failures:
                    log.warning("PLC reachable again" if self.driver.has_outputs else "action driver works again",
                                **self.driver.describe())
            if not self.plc_checked:
                self._check_plc()
                if self.release_unsaved or self.file_dirty:
                    self._save()
            want = self._want()
            written: dict[str, Any] = {}
            if self.driver.has_outputs:
                if self.dirty:
                    written = {"outputs": {"stop": want[0], "alarm": want[1]}, **self.driver.set_outputs(*want)}
                    self.dirty = False
                    self.next_verify = now + self.heartbeat_s
                elif now >= self.next_verify:
                    got = self.driver.read_outputs()
                    if got != want:
                        self.counters["outputs_rewritten"] += 1
                        log.warning("PLC outputs differ from the latch (PLC restarted?): writing them again",
                                    plc={"stop": got[0], "alarm": got[1]}, latch={"stop": want[0], "alarm": want[1]})
                        self.driver.set_outputs(*want)
                    self.next_verify = now + self.heartbeat_s
                self.outputs = want
                self._outputs_confirmed(want)
            for job in list(self.pending):
                job.env["KNITWATCH_LATCHED"] = "1" if self.latch["stop"] else "0"
                result = self.driver.notify(job)
                self.pending.remove(job)
                self._confirm(job, {**written, **result})
            if self.driver.has_heartbeat and now >= self.next_hb:
                self.next_hb = now + self.heartbeat_s
                if self._alive(now):
                    self.hb_counter += 1
                    self.driver.heartbeat(self.hb_counter)
            self.delay = self.retry_initial_s
            self.retry_at = 0.0
        except ActionError as e:
            self._failure(now, str(e))

    def _outputs_confirmed(self, want: tuple[bool, bool]) -> None:
        if self.confirmed_outputs != want:
            self.confirmed_outputs = want
            self.file_dirty = True
        if not want[0] and self.release_pending is not None:
            self.release_pending = None
            self.file_dirty = True

    def _failure(self, now: float, msg: str) -> None:
        self.failures += 1
        self.last_error = msg
        self._last_error_mono = now
        self.connected = False
        for job in self.pending:
            job.errors = [*job.errors[-4:], msg]
        self.retry_at = now + self.delay
        log.error("action failed: will retry", error=msg, retry_in_s=round(self.delay, 3), failures=self.failures,
                  pending=[(j.action, j.camera, j.event_id) for j in self.pending],
                  latched_stop=sorted(self.latch["stop"]), **self.driver.describe())
        self.delay = min(self.delay * 2, self.retry_max_s)
        with contextlib.suppress(Exception):
            self.driver.close()

    def _confirm(self, job: Job, result: dict[str, Any]) -> None:
        now_ns = time.monotonic_ns()
        lat: dict[str, float] = {}
        if not job.restored:
            if job.t_capture_mono_ns:
                lat["capture_to_decision"] = round((job.t_decision_mono_ns - job.t_capture_mono_ns) / 1e6, 2)
                lat["capture_to_action"] = round((now_ns - job.t_capture_mono_ns) / 1e6, 2)
            lat["decision_to_action"] = round((now_ns - job.t_decision_mono_ns) / 1e6, 2)
        res: dict[str, Any] = {"driver": self.driver.name, "action": job.action, "confirmed": True,
                               "at": iso_utc(time.time_ns()), "attempts": job.attempts, "latency_ms": lat, **result}
        if job.errors:
            res["errors"] = job.errors[-3:]
        if job.restored:
            res["restored_after_restart"] = True
        self.counters["confirmed"] += 1
        if lat:
            self._latency.append(lat.get("capture_to_action", lat["decision_to_action"]))
        if job.kind == "ack":
            log.warning("acknowledge done: outputs reset", ack_id=job.ack_id, ack=job.ack_token,
                        camera=job.camera or "all", attempts=job.attempts,
                        still_latched={a: sorted(c) for a, c in self.latch.items() if c})
            entry = self._ack_entry(job.ack_token)
            if entry is not None:
                entry["cleared_ns"] = time.time_ns()
                entry["result"] = res
                self.file_dirty = True
            ack_id = entry["ack_id"] if entry is not None and entry["in_store"] else job.ack_id
            if self.store is not None and ack_id is not None:
                try:
                    self.store.ack_cleared(ack_id, res)
                except (StoreError, sqlite3.Error) as e:
                    self.counters["store_errors"] += 1
                    log.error("cannot record the acknowledge's result", ack_id=ack_id, error=str(e))
            return
        log.warning("action confirmed", action=job.action, camera=job.camera, event_id=job.event_id,
                    attempts=job.attempts, latency_ms=lat, **self.driver.describe())
        self._record_event(job, res, "confirmed", latency=lat)

    def _record_event(self, job: Job, res: dict[str, Any], state: str,
                      latency: dict[str, float] | None = None) -> None:
        if self.store is None or job.event_id is None or job.event_id == 0:
            return
        if job.event_id < 0:  # held in memory: the result goes with it into the store
            with self._held_lock:
                h = next((h for h in self.held if h.local_id == job.event_id), None)
                if h is not None:
                    h.results.append(res)
                    h.action_state = state
                    if latency:
                        h.record["latency_ms"] = {**h.record.get("latency_ms", {}), **latency}
            return
        patch = {"latency_ms": latency} if latency else None
        if not self.store.update_record(job.event_id, patch, append_action=res, action_state=state):
            self.counters["store_errors"] += 1

    # ------------------------------------------------------------------ the latch file
    def _state(self) -> dict[str, Any]:
        now = time.time_ns()
        return {
            "written": iso_utc(now), "written_ns": now, "pid": os.getpid(),
            "latch": {a: {cam: {str(i): s for i, s in sorted(ids.items())} for cam, ids in sorted(cams.items())}
                      for a, cams in self.latch.items()},
            "latch_seq": self.latch_seq,
            "outputs": None if self.confirmed_outputs is None else {"stop": self.confirmed_outputs[0],
                                                                    "alarm": self.confirmed_outputs[1]},
            "release_pending": self.release_pending,
            "acks": self.acks_log,
        }

    def _save(self, force: bool = False) -> None:
        if self.latch_file is None or not (self.file_dirty or force):
            return
        now = time.monotonic()
        if not force and now < self._file_retry_at:
            return
        try:
            how = self.latch_file.write(self._state())
        except OSError as e:
            self.file_problem = f"cannot write {LATCH_FILE}: {e.strerror or e}"
            self._file_retry_at = now + 1.0
            self.counters["latch_file_errors"] += 1
            self._warn("latch_file", "CANNOT WRITE THE LATCH FILE: the latch is kept in memory and on the PLC "
                       "(a restart keeps a stop the PLC holds)", error=str(e), latch_dir=str(self.latch_dir))
            return
        self.file_dirty = self.release_unsaved = False
        if how == "in place":
            self.counters["latch_file_in_place"] += 1
            self._warn("latch_in_place", "no room for a new latch file (disk full?): written over the old one in "
                       "place")
        if self.file_problem:
            log.warning("latch file written", previous_problem=self.file_problem)
            self.file_problem = ""

    def _watch_latch_file(self) -> None:
        if self.latch_file is None:
            return
        if self.latch_file.gone():
            self.counters["latch_file_lost"] += 1
            log.error("THE LATCH FILE WAS REMOVED OR REPLACED while running: written again from memory",
                      latch_dir=str(self.latch_dir))
            self.file_dirty = True
            self._file_retry_at = 0.0
        if self.latch_dir is not None:
            ensure_mailbox(self.latch_dir)

    # ------------------------------------------------------------------ the store
    def _store_work(self, now: float) -> None:
        """Write held events and acknowledges applied without the index once the store takes them."""
        store = self.store
        if store is None or now < self.next_store_work:
            return
        if not (self.held or store.problem or not store.usable or any(not a["in_store"] for a in self.acks_log)):
            return
        self.next_store_work = now + STORE_RETRY_S
        if not store.check():
            return
        self._flush_held(store)
        self._sync_acks(store)

    def _flush_held(self, store: Store) -> None:
        with self._held_lock:
            items = list(self.held)
        for h in items:
            rec = {**h.record, "held_in_memory": {"local_id": h.local_id, "since": iso_utc(h.held_ns),
                                                  "written": iso_utc(time.time_ns())}}
            try:
                new_id = store.add_event(rec, **h.index)
            except StoreError:
                return
            with self._held_lock:
                self.held.remove(h)
            self._remap(h.local_id, new_id)
            self.counters["held_written"] += 1
            with contextlib.suppress(StoreError, sqlite3.Error):
                for res in h.results:
                    store.update_record(new_id, append_action=res)
                if h.action_state:
                    store.update_record(new_id, action_state=h.action_state)
                for a in self.acks_log:  # acknowledged while held, by an acknowledge the store has
                    if a["in_store"] and a["ack_id"] is not None and new_id in a["released"]:
                        store.mark_acked([new_id], a["ack_id"])
            log.warning("event held in memory written to the store", local_id=h.local_id, event_id=new_id,
                        held_s=round((time.time_ns() - h.held_ns) / 1e9, 1))
            if h.on_stored is not None:
                try:
                    h.on_stored(new_id)
                except Exception:  # the caller's pictures: never the runner's end
                    log.exception("cannot hand on the pictures of a held event", event_id=new_id)
            else:
                store.mark_files_missing(new_id, "held in memory while the store was unusable: pictures not kept")

    def _remap(self, old: int, new: int) -> None:
        for cams in self.latch.values():
            for ids in cams.values():
                if old in ids:
                    ids[new] = ids.pop(old)
                    self.file_dirty = True
        for job in self.pending:
            if job.event_id == old:
                job.event_id = new
        for a in self.acks_log:
            if old in a["released"]:
                a["released"] = sorted(new if i == old else i for i in a["released"])
                self.file_dirty = True

    def _sync_acks(self, store: Store) -> None:
        for a in self.acks_log:
            if a["in_store"]:
                continue
            try:
                a["ack_id"] = store.record_ack(by=a["by"], camera=a["camera"], note=a["note"],
                                               requested_ns=a["requested_ns"], event_ids=a["released"],
                                               result=a.get("result"))
            except StoreError as e:
                self._warn("sync_acks", "cannot record an acknowledge in the store's index yet", error=str(e))
                return
            a["in_store"] = True
            self.file_dirty = True
            log.warning("acknowledge applied without the index recorded there", ack=a["token"], ack_id=a["ack_id"],
                        events=len([i for i in a["released"] if i > 0]))
        self._trim_acks()

    # ------------------------------------------------------------------ reporting
    def _warn(self, key: str, msg: str, **kw: Any) -> None:
        """Log an error at most once a minute per ``key`` (a fault that lasts is not a log flood)."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= 60.0:
            self._warned[key] = now
            log.error(msg, **kw)

    def degraded(self) -> list[str]:
        """Why the latch or the actions are degraded (no absolute paths: ``/healthz`` shows them)."""
        out = []
        if self.driver.has_outputs and not self.connected and self.failures:
            out.append(f"PLC: not reachable ({self.failures} failed attempts; a latched stop is written when it is)")
        if self.file_problem:
            out.append(f"latch file: {self.file_problem}")
        store = self.store
        if store is not None and (store.problem or self.held):
            held = f"; {len(self.held)} event(s) held in memory until it works" if self.held else ""
            out.append(f"store: {store.problem or 'events not yet written'}{held}")
        return out

    def _publish(self) -> None:
        now = time.monotonic()
        with self._counters_lock:
            counters = dict(self.counters)
        self._snapshot = {
            "driver": self.driver.name,
            "plc_connected": self.connected,
            "pending": len(self.pending) + self._q.qsize(),
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_age_s": None if self._last_error_mono is None else round(now - self._last_error_mono, 1),
            "latched": bool(self.latch["stop"]),
            "latched_cameras": {a: sorted(c) for a, c in self.latch.items()},
            "latched_events": {a: {cam: sorted(ids) for cam, ids in c.items()} for a, c in self.latch.items()},
            "outputs": None if self.outputs is None else {"stop": self.outputs[0], "alarm": self.outputs[1]},
            "heartbeat": self.hb_counter,
            "heartbeat_paused": self.hb_paused,
            "retry_in_s": round(max(0.0, self.retry_at - now), 2) if self.retry_at else 0.0,
            "action_latency_ms": _percentiles(list(self._latency)),
            "latch_file": None if self.latch_file is None else {"ok": not self.file_problem,
                                                                "problem": self.file_problem},
            "store": None if self.store is None else {
                "ok": not self.store.problem and self.store.usable, "problem": self.store.problem,
                "held_events": len(self.held), "acks_not_in_store": sum(not a["in_store"] for a in self.acks_log)},
            "degraded": self.degraded(),
            **counters,
        }


def _ack_env(ack_id: int | None, by: str, camera: str | None, note: str) -> dict[str, str]:
    return {"KNITWATCH_ACTION": "ack", "KNITWATCH_ACK_ID": "" if ack_id is None else str(ack_id),
            "KNITWATCH_ACK_BY": by, "KNITWATCH_ACK_NOTE": note, "KNITWATCH_CAMERA": camera or ""}
