"""The one simulated PLC used by the demo and the tests: a real Modbus TCP server (pymodbus) on
loopback, in a thread of its own, that the ``modbus`` driver talks to as to a machine's PLC.

Layout (the demo's; a test may use any address): 32 coils and 32 holding registers, all 0 at start,
like a PLC after power-up; coil 0 = stop, 1 = heartbeat, 2 = alarm. :meth:`SimulatedPlc.poll` watches
the stop and heartbeat coils as a PLC program would; :meth:`SimulatedPlc.stop` and
:meth:`SimulatedPlc.restart` take the PLC away and bring it back with its outputs forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

STOP_COIL, HEARTBEAT_COIL, ALARM_COIL = 0, 1, 2
SIZE = 32  # coils and holding registers
READ_TIMEOUT_S = 5.0


class SimulatedPlcError(RuntimeError):
    """The simulated PLC could not start (the port is taken, pymodbus failed)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the system picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SimulatedPlc:
    """The machine's PLC, simulated: a real Modbus TCP server (pymodbus) on ``host``:``port`` (port 0:
    a free one) in a thread. It counts stops (rising edges of the stop coil) and heartbeat toggles, as
    a real PLC program would watch them (:meth:`poll`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.stops = 0
        self.heartbeats = 0
        self.stop_on = False
        self.stopped_since: float | None = None
        self.last_beat: float | None = None
        self._hb: bool | None = None
        self._error = ""

    def start(self, timeout: float = 10.0) -> SimulatedPlc:
        """Serve (all coils and registers 0); :class:`SimulatedPlcError` when it does not come up."""
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self.loop = loop
        self._error = ""

        def serve() -> None:
            asyncio.set_event_loop(loop)

            async def main() -> None:
                try:
                    bits = [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)]
                    regs = [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)]
                    device = SimDevice(id=0, simdata=(bits, list(bits), regs, list(regs)))
                    self.server = ModbusTcpServer(device, address=(self.host, self.port))
                    await self.server.serve_forever(background=True)
                except Exception as e:  # noqa: BLE001 - reported by start()
                    self._error = f"{type(e).__name__}: {e}"
                    ready.set()
                    return
                ready.set()
                await self.server.serving

            loop.run_until_complete(main())

        self.thread = threading.Thread(target=serve, name="knitwatch-simulated-plc", daemon=True)
        self.thread.start()
        if not ready.wait(timeout) or self._error:
            raise SimulatedPlcError(
                f"the simulated PLC did not start on {self.host}:{self.port}: {self._error or 'timeout'}")
        return self

    def _get(self, func_code: int, address: int) -> int:
        if self.server is None or self.loop is None:
            raise SimulatedPlcError("the simulated PLC is not running")
        fut = asyncio.run_coroutine_threadsafe(self.server.async_getValues(1, func_code, address, 1), self.loop)
        return int(fut.result(READ_TIMEOUT_S)[0])

    def coil(self, address: int) -> bool:
        """The coil at ``address`` (as the PLC sees it)."""
        return bool(self._get(1, address))

    def register(self, address: int) -> int:
        """The holding register at ``address``."""
        return self._get(3, address)

    def poll(self) -> None:
        """Read the stop and heartbeat coils (call a few times a second) and count what changed."""
        now = time.monotonic()
        stop, hb = self.coil(STOP_COIL), self.coil(HEARTBEAT_COIL)
        if stop and not self.stop_on:
            self.stops += 1
            self.stopped_since = now
        if not stop:
            self.stopped_since = None
        self.stop_on = stop
        if self._hb is not None and hb != self._hb:
            self.heartbeats += 1
            self.last_beat = now
        self._hb = hb

    def stop(self) -> None:
        """Shut the server down (the PLC is gone: connections are refused); again: nothing."""
        if self.server is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
            if self.thread is not None:
                self.thread.join(5)
            self.server = None

    def restart(self, timeout: float = 10.0) -> SimulatedPlc:
        """The PLC restarts on the same port: a fresh server whose coils and registers are all 0 again."""
        self.stop()
        return self.start(timeout)
