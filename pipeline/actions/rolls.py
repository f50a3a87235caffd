"""Rolls in the alert stage: the PLC's doff signal and the bookkeeping of the open roll.

A thread of the alert process (:class:`RollKeeper`, never the stage's loop) every ``poll_s``:

* reads the **doff signal** (``[plc] doff_address`` in ``doff_table``: a coil, discrete input, holding
  or input register of the PLC at ``[plc] host``:``port``, over a Modbus TCP connection of its own,
  whatever the ``[plc] driver``): when it goes from 0 to non-zero, a new roll starts (reason
  ``doff``). The first value read is only remembered (a signal already on at start is no doff); a
  change while the PLC was unreachable counts when it is read again. A doff the store cannot take yet
  is kept and written when it can;
* takes the rolls that were started elsewhere (``knitwatch roll new``, the API, a doff) - the store's
  *pending* rolls - and records each camera's fabric position at the change: the new roll's
  ``start_pos`` and the previous roll's ``end_pos`` (:meth:`Store.roll_handled`);
* gives a camera the open roll has no start position for (the daemon started after the roll did) its
  first position, and keeps the open roll's ``end_pos`` up to date every ``position_every_s``.

The stage hands each frame's fabric position to :meth:`RollKeeper.saw` (a dict write, no waiting).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import Counter
from typing import Any

import structlog

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.decision.tracking import FramePosition
from knitwatch.pipeline.store.database import Store, StoreError

log = structlog.get_logger(__name__)

POSITION_EVERY_S = 5.0


def position_revs(pos: FramePosition) -> float:
    """A frame's place on the fabric in revolutions: the counter plus the fraction of the circumference."""
    if pos.circumference_px:
        return pos.rev + (pos.offset_px % pos.circumference_px) / pos.circumference_px
    return float(pos.rev)


class DoffSignal:
    """The doff signal of the PLC: :meth:`read` returns its value (ConnectionError/OSError on trouble)."""

    def __init__(self, plc: PlcConfig) -> None:
        from pymodbus.client import ModbusTcpClient

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        assert plc.doff_address is not None
        self.address = plc.doff_address
        self.table = plc.doff_table
        self.unit_id = plc.unit_id
        self.where = f"{plc.host}:{plc.port} {plc.doff_table} {plc.doff_address}"
        self.client = ModbusTcpClient(plc.host, port=plc.port, timeout=plc.timeout_s, retries=0)

    def read(self) -> int:
        from pymodbus.exceptions import ModbusException

        try:
            if not self.client.connected and not self.client.connect():
                raise ConnectionError(f"cannot connect to the PLC at {self.where}")
            read = {"coil": self.client.read_coils, "discrete_input": self.client.read_discrete_inputs,
                    "holding_register": self.client.read_holding_registers,
                    "input_register": self.client.read_input_registers}[self.table]
            rr = read(self.address, count=1, device_id=self.unit_id)
            if rr is None or rr.isError():
                raise ConnectionError(f"the PLC refused to read the doff signal ({self.where}): {rr}")
            return int(bool(rr.bits[0])) if self.table in ("coil", "discrete_input") else int(rr.registers[0])
        except (ModbusException, AttributeError, IndexError) as e:
            self.client.close()
            raise ConnectionError(f"doff signal ({self.where}): {type(e).__name__}: {e}") from e
        except OSError:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()


class RollKeeper:
    """The alert stage's side of the rolls (see the module's description); a thread once started."""

    def __init__(self, store: Store, plc: PlcConfig, cameras: list[str], *, poll_s: float = 0.5,
                 position_every_s: float = POSITION_EVERY_S) -> None:
        self.store = store
        self.cameras = list(cameras)
        self.signal = DoffSignal(plc) if plc.doff_address is not None else None
        self.poll_s = min(poll_s, plc.doff_poll_s) if self.signal is not None else poll_s
        self.position_every_s = position_every_s
        self.revs: dict[str, float] = {}  # camera -> its latest fabric position (revolutions)
        self.counters: Counter[str] = Counter()
        self.roll_id: int | None = None
        self.doff_value: int | None = None
        self.doffs_waiting = 0  # doff edges the store has not taken yet
        self.doff_problem = ""
        self._started: set[str] = set()  # cameras the open roll has a start position for
        self._next_position = 0.0
        self._warned: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="knitwatch-rolls", daemon=True)

    def start(self) -> RollKeeper:
        self._thread.start()
        return self

    def saw(self, camera: str, pos: FramePosition | None) -> None:
        """A frame of ``camera`` at ``pos`` (None: no position; nothing is recorded)."""
        if pos is not None:
            self.revs[camera] = position_revs(pos)

    def stats(self) -> dict[str, Any]:
        return {"roll": self.roll_id, "doff_signal": None if self.signal is None else {
            "where": self.signal.where, "value": self.doff_value, "ok": not self.doff_problem,
            "problem": self.doff_problem, "waiting": self.doffs_waiting}, **self.counters}

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread; the open roll's position is written one last time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(StoreError, sqlite3.Error):
            if self.roll_id is not None and self.revs:
                self.store.update_roll_position(self.roll_id, dict(self.revs))
        if self.signal is not None:
            self.signal.close()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(time.monotonic())
            except Exception:  # the thread must live on whatever happens
                log.exception("roll keeper error")
                self.counters["errors"] += 1
            self._stop.wait(self.poll_s)

    def step(self, now: float) -> None:
        """One round: the doff signal, the pending rolls, the open roll's positions."""
        if self.signal is not None:
            self._read_doff()
        try:
            self._store_work(now)
        except (StoreError, sqlite3.Error) as e:
            self.counters["store_errors"] += 1
            self._warn("store", "cannot keep the rolls in the store (new rolls wait until it works)", error=str(e))

    def _read_doff(self) -> None:
        assert self.signal is not None
        try:
            value = self.signal.read()
        except (ConnectionError, OSError) as e:
            self.counters["doff_read_errors"] += 1
            self.doff_problem = str(e)
            self._warn("doff", "cannot read the doff signal from the PLC: rolls do not change on doffs until it "
                       "is read again", error=str(e))
            return
        if self.doff_problem:
            log.warning("doff signal read again", previous_problem=self.doff_problem)
            self.doff_problem = ""
        if self.doff_value is not None and self.doff_value == 0 and value != 0:
            self.doffs_waiting += 1
            self.counters["doffs"] += 1
            log.warning("doff signal: a new roll starts", value=value, where=self.signal.where)
        self.doff_value = value

    def _store_work(self, now: float) -> None:
        while self.doffs_waiting:
            rid = self.store.new_roll("doff", "plc", cameras=self.cameras)
            self.doffs_waiting -= 1
            log.info("roll started by the doff signal", roll_id=rid)
        revs = dict(self.revs)
        for roll in self.store.pending_rolls():
            self.store.roll_handled(roll["id"], revs, previous_end_pos=revs)
            self.counters["rolls"] += 1
            log.warning("new roll", roll_id=roll["id"], reason=roll["reason"], by=roll["by"], note=roll["note"],
                        start_pos={c: round(v, 3) for c, v in revs.items()})
        cur = self.store.current_roll(count_events=False)
        if cur is None:
            return
        if cur["id"] != self.roll_id:
            self.roll_id = cur["id"]
            self._started = set(cur["start_pos"])
            self._next_position = 0.0
        for cam in set(revs) - self._started:  # the daemon started after the roll did
            self.store.set_roll_start(cur["id"], cam, revs[cam])
            self._started.add(cam)
        if revs and now >= self._next_position:
            self._next_position = now + self.position_every_s
            self.store.update_roll_position(cur["id"], revs)

    def _warn(self, key: str, msg: str, **kw: Any) -> None:
        """Log an error at most once a minute per ``key``."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= 60.0:
            self._warned[key] = now
            log.error(msg, **kw)
