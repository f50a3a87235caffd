"""The action runner: a worker thread inside the alert process that owns the latch and the driver.

The alert stage only *submits* (a queue put, never blocking); the thread

- keeps the **latch**: per camera the unacknowledged stop / alarm events. The stop output is on
  while any camera has a latched stop, the alarm output while any stop or alarm is latched; the
  latch is rebuilt from the store at start-up, so a restart neither loses a stop nor clears it;
- writes the outputs and **confirms** them by reading them back; what cannot be confirmed is retried
  with exponential back-off (``retry_initial_s`` doubling up to ``retry_max_s``) until it is, loudly
  (every failure is logged at error level and counted in ``stats()``); a new stop is tried at once;
- re-checks the outputs every ``heartbeat_s`` and writes them again when the PLC lost them (a PLC
  restart clears its coils: the stop lands again);
- toggles the **heartbeat** every ``heartbeat_s`` while inspection really runs: the stage's loop
  ticks, and a result arrived within ``heartbeat_idle_s``; when knitwatch dies or stalls the heartbeat
  stops and the PLC fails safe;
- polls the store's acknowledges every ``ack_poll_s``, resets the latch they cover, cancels actions
  of acknowledged events that never landed, clears the outputs and records the handling;
- runs the driver's per-job work (the command driver's program) and writes every confirmed result
  with its latencies into the event's record.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import sqlite3
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import structlog

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, Driver, Job, event_env
from knitwatch.pipeline.store.database import Store, StoreError, iso_utc

log = structlog.get_logger(__name__)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "max": round(float(arr.max()), 2)}


class ActionRunner:
    def __init__(self, driver: Driver, plc: PlcConfig | None = None, *, store: Store | None = None,
                 ack_poll_s: float = 0.5, queue_size: int = 1000) -> None:
        """``plc``: the ``[plc]`` section's timing (heartbeat, retries); its defaults when not given."""
        plc = plc if plc is not None else PlcConfig()
        self.driver = driver
        self.store = store
        self.heartbeat_s = plc.heartbeat_s
        self.heartbeat_idle_s = plc.heartbeat_idle_s
        self.stall_s = max(3.0 * self.heartbeat_s, 2.0)
        self.retry_initial_s = plc.retry_initial_s
        self.retry_max_s = plc.retry_max_s
        self.ack_poll_s = ack_poll_s
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.latch: dict[str, dict[str, set[int]]] = {"stop": {}, "alarm": {}}
        self.pending: list[Job] = []
        self.dirty = driver.has_outputs  # the outputs follow the latch from the start
        self.outputs: tuple[bool, bool] | None = None
        self.connected = not driver.has_outputs
        self.failures = 0
        self.last_error = ""
        self._last_error_mono: float | None = None
        self.counters: Counter[str] = Counter()
        self.delay = self.retry_initial_s
        self.retry_at = 0.0
        self.urgent = True
        self.hb_counter = 0
        self.hb_paused = self.heartbeat_idle_s > 0  # until the first inspection result
        now = time.monotonic()
        self.next_hb = self.next_verify = self.next_ack_poll = now
        self._tick = now
        self._last_result = float("-inf")  # the heartbeat starts with the first inspection result
        self._latency: collections.deque[float] = collections.deque(maxlen=500)
        self._local_ids = itertools.count(-1, -1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: dict[str, Any] = {}
        self._store_warned = 0.0
        self._publish()

    # ------------------------------------------------------------------ the stage's side (any thread)
    def start(self) -> ActionRunner:
        self._restore()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="knitwatch-actions", daemon=True)
        self._thread.start()
        return self

    def local_event_id(self) -> int:
        """An id for an event the store could not take (negative: every acknowledge covers it)."""
        return next(self._local_ids)

    def submit(self, job: Job) -> bool:
        """Queue a job (never blocks); False (counted, logged) only if the queue is full."""
        try:
            self._q.put_nowait(job)
            return True
        except queue.Full:
            self.counters["dropped"] += 1
            log.error("action queue is full: action dropped", action=job.action, camera=job.camera,
                      event_id=job.event_id)
            return False

    def acknowledge(self, by: str, camera: str | None = None, note: str = "") -> None:
        """Acknowledge in-process (without a store; with one, use ``Store.request_ack``)."""
        self.submit(Job("ack", "ack", camera, env=_ack_env(None, by, camera, note),
                        covers_event_id=None))

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
        is not confirmed is in the store and retried at the next start), then end the thread (the
        heartbeat stops with it) and close the driver. The latch stays on the PLC and in the store."""
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
        with contextlib.suppress(Exception):
            self.driver.shutdown()
        self._publish()

    # ------------------------------------------------------------------ thread
    def _restore(self) -> None:
        if self.store is None:
            return
        try:
            for e in self.store.latched_events():
                self.latch[e["action"]].setdefault(e["camera"], set()).add(int(e["id"]))
            for ev in self.store.unconfirmed_events():
                self.pending.append(Job("event", ev["action"], ev["camera"], event_id=int(ev["id"]),
                                        env=event_env(ev.get("record", {})), restored=True))
        except (StoreError, sqlite3.Error) as e:
            log.error("cannot read the latch from the store: starting unlatched", error=str(e))
        if any(self.latch.values()) or self.pending:
            log.warning("latch restored from the store", stop=sorted(self.latch["stop"]),
                        alarm=sorted(self.latch["alarm"]), unconfirmed=len(self.pending))

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
        if self.store is not None and now >= self.next_ack_poll:
            self.next_ack_poll = now + self.ack_poll_s
            self._poll_acks()
        urgent, self.urgent = self.urgent, False
        if self._work_due(now) and (urgent or now >= self.retry_at):
            self._attempt(now)

    def _work_due(self, now: float) -> bool:
        return bool(self.pending or self.dirty or (self.driver.has_outputs and now >= self.next_verify)
                    or (self.driver.has_heartbeat and now >= self.next_hb))

    def _wait_s(self) -> float:
        now = time.monotonic()
        due = [now + 0.5]
        if self.urgent:
            return 0.0
        if self.pending or self.dirty:
            due.append(self.retry_at)
        if self.driver.has_heartbeat:
            due.append(max(self.next_hb, self.retry_at))
        if self.driver.has_outputs:
            due.append(max(self.next_verify, self.retry_at))
        if self.store is not None:
            due.append(self.next_ack_poll)
        return min(0.5, max(0.001, min(due) - now))

    def _take(self, job: Job) -> None:
        self.urgent = True
        if job.kind == "ack":
            self._apply_ack(job, by=job.env.get("KNITWATCH_ACK_BY", ""), note=job.env.get("KNITWATCH_ACK_NOTE", ""))
            return
        if job.action in self.latch and job.event_id is not None and job.camera is not None:
            self.latch[job.action].setdefault(job.camera, set()).add(job.event_id)
            self.dirty = self.driver.has_outputs
        self.pending.append(job)

    def _want(self) -> tuple[bool, bool]:
        stop = bool(self.latch["stop"])
        return stop, stop or bool(self.latch["alarm"])

    def _apply_ack(self, job: Job, *, by: str, note: str) -> None:
        covers = job.covers_event_id

        def covered(camera: str | None, event_id: int | None) -> bool:
            return (job.camera is None or camera == job.camera) and (
                covers is None or event_id is None or event_id <= covers)

        released = 0
        for cams in self.latch.values():
            for cam in list(cams):
                hit = {i for i in cams[cam] if covered(cam, i)}
                released += len(hit)
                cams[cam] -= hit
                if not cams[cam]:
                    del cams[cam]
        for p in [p for p in self.pending if p.kind == "event" and covered(p.camera, p.event_id)]:
            self.pending.remove(p)
            self.counters["cancelled"] += 1
            log.warning("acknowledged before the action could be confirmed: cancelled", action=p.action,
                        camera=p.camera, event_id=p.event_id, ack_id=job.ack_id, attempts=p.attempts)
            self._record_event(p, {"driver": self.driver.name, "action": p.action, "confirmed": False,
                                   "cancelled_by_ack": job.ack_id, "attempts": p.attempts,
                                   "errors": p.errors[-3:]}, "cancelled")
        self.dirty = self.driver.has_outputs
        self.pending.append(job)
        self.counters["acks"] += 1
        self.urgent = True
        log.warning("acknowledged: latch reset", by=by, camera=job.camera or "all", note=note, ack_id=job.ack_id,
                    released=released, still_latched={a: sorted(c) for a, c in self.latch.items() if c})

    def _poll_acks(self) -> None:
        assert self.store is not None
        try:
            for ack in self.store.pending_acks():
                self.store.apply_ack(ack["id"])
                job = Job("ack", "ack", ack["camera"], ack_id=ack["id"], covers_event_id=ack["max_event_id"],
                          env=_ack_env(ack["id"], ack["by"], ack["camera"], ack["note"]))
                self._apply_ack(job, by=ack["by"], note=ack["note"])
        except (StoreError, sqlite3.Error) as e:
            self.counters["store_errors"] += 1
            now = time.monotonic()
            if now - self._store_warned > 60:
                self._store_warned = now
                log.error("cannot read acknowledges from the store", error=str(e))

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
            log.warning("acknowledge done: outputs reset", ack_id=job.ack_id, camera=job.camera or "all",
                        attempts=job.attempts, still_latched={a: sorted(c) for a, c in self.latch.items() if c})
            if self.store is not None and job.ack_id is not None:
                try:
                    self.store.ack_cleared(job.ack_id, res)
                except (StoreError, sqlite3.Error) as e:
                    self.counters["store_errors"] += 1
                    log.error("cannot record the acknowledge's result", ack_id=job.ack_id, error=str(e))
            return
        log.warning("action confirmed", action=job.action, camera=job.camera, event_id=job.event_id,
                    attempts=job.attempts, latency_ms=lat, **self.driver.describe())
        self._record_event(job, res, "confirmed", latency=lat)

    def _record_event(self, job: Job, res: dict[str, Any], state: str,
                      latency: dict[str, float] | None = None) -> None:
        if self.store is None or job.event_id is None or job.event_id <= 0:
            return
        patch = {"latency_ms": latency} if latency else None
        if not self.store.update_record(job.event_id, patch, append_action=res, action_state=state):
            self.counters["store_errors"] += 1

    def _publish(self) -> None:
        now = time.monotonic()
        self._snapshot = {
            "driver": self.driver.name,
            "plc_connected": self.connected,
            "pending": len(self.pending) + self._q.qsize(),
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_age_s": None if self._last_error_mono is None else round(now - self._last_error_mono, 1),
            "latched": bool(self.latch["stop"]),
            "latched_cameras": {a: sorted(c) for a, c in self.latch.items()},
            "outputs": None if self.outputs is None else {"stop": self.outputs[0], "alarm": self.outputs[1]},
            "heartbeat": self.hb_counter,
            "heartbeat_paused": self.hb_paused,
            "retry_in_s": round(max(0.0, self.retry_at - now), 2) if self.retry_at else 0.0,
            "action_latency_ms": _percentiles(list(self._latency)),
            **self.counters,
        }


def _ack_env(ack_id: int | None, by: str, camera: str | None, note: str) -> dict[str, str]:
    return {"KNITWATCH_ACTION": "ack", "KNITWATCH_ACK_ID": "" if ack_id is None else str(ack_id),
            "KNITWATCH_ACK_BY": by, "KNITWATCH_ACK_NOTE": note, "KNITWATCH_CAMERA": camera or ""}
