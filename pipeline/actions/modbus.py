"""The ``modbus`` driver (Modbus TCP, pymodbus): stop and alarm outputs and a heartbeat, as coils
or holding registers of the machine's PLC.

Coil mode: the stop coil is 1 while a stop is latched, else 0; the optional alarm coil is 1 while a
stop or an alarm is latched; the heartbeat coil toggles. Register mode: the stop register holds
``stop_value`` while a stop is latched, else 0; the alarm register 1/0; the heartbeat register
counts up (mod 65536). Every write is confirmed by reading the output back.
"""

from __future__ import annotations

import logging
from typing import Any

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, Driver


class ModbusDriver(Driver):
    name = "modbus"
    has_outputs = True

    def __init__(self, plc: PlcConfig) -> None:
        """The PLC at ``plc.host``:``plc.port`` (the ``[plc]`` section; its ``driver`` is not looked at)."""
        from pymodbus.client import ModbusTcpClient

        # pymodbus logs every failed connect as an error of its own; the action runner reports them once, loudly
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        if plc.output not in ("coil", "register"):
            raise ValueError(f"output must be 'coil' or 'register', not {plc.output!r}")
        self.host, self.port, self.unit_id = plc.host, plc.port, plc.unit_id
        self.coils = plc.output == "coil"
        self.stop_address = plc.stop_address
        self.alarm_address = plc.alarm_address
        self.heartbeat_address = plc.heartbeat_address
        self.has_heartbeat = plc.heartbeat_address is not None
        self.stop_value = plc.stop_value
        self.client = ModbusTcpClient(plc.host, port=plc.port, timeout=plc.timeout_s, retries=0)

    # -- low level
    def _check(self, rr: Any, what: str) -> Any:  # noqa: ANN401
        if rr is None or rr.isError():
            raise ActionError(f"PLC {self.host}:{self.port} refused to {what}: {rr}")
        return rr

    def _write(self, address: int, value: int) -> None:
        if self.coils:
            self._check(self.client.write_coil(address, bool(value), device_id=self.unit_id),
                        f"write coil {address}")
        else:
            self._check(self.client.write_register(address, int(value) & 0xFFFF, device_id=self.unit_id),
                        f"write register {address}")

    def _read(self, address: int) -> int:
        if self.coils:
            rr = self._check(self.client.read_coils(address, count=1, device_id=self.unit_id), f"read coil {address}")
            return int(bool(rr.bits[0]))
        rr = self._check(self.client.read_holding_registers(address, count=1, device_id=self.unit_id),
                         f"read register {address}")
        return int(rr.registers[0])

    def _guard(self, fn: Any, *args: Any) -> Any:  # noqa: ANN401
        from pymodbus.exceptions import ModbusException

        try:
            self.connect()
            return fn(*args)
        except ActionError:
            self.close()
            raise
        except (ModbusException, OSError, AttributeError, IndexError) as e:
            self.close()
            raise ActionError(f"PLC {self.host}:{self.port}: {type(e).__name__}: {e}") from e

    # -- driver
    def connect(self) -> None:
        if self.client.connected:
            return
        if not self.client.connect():
            raise ActionError(f"cannot connect to the PLC at {self.host}:{self.port}")

    def close(self) -> None:
        self.client.close()

    def _values(self, stop: bool, alarm: bool) -> list[tuple[int, int]]:
        out = [(self.stop_address, (self.stop_value if not self.coils else 1) if stop else 0)]
        if self.alarm_address is not None:
            out.append((self.alarm_address, 1 if (alarm or stop) else 0))
        return out

    def set_outputs(self, stop: bool, alarm: bool) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            for address, value in self._values(stop, alarm):
                self._write(address, value)
            for address, value in self._values(stop, alarm):
                got = self._read(address)
                if got != value:
                    raise ActionError(f"PLC {self.host}:{self.port} holds {got} at {address} after writing {value}")
            return {"stop_output": int(stop), "read_back": True}

        return self._guard(do)

    def read_outputs(self) -> tuple[bool, bool]:
        def do() -> tuple[bool, bool]:
            stop = self._read(self.stop_address) == (1 if self.coils else self.stop_value)
            alarm = stop if self.alarm_address is None else bool(self._read(self.alarm_address))
            return stop, alarm

        return self._guard(do)

    def heartbeat(self, counter: int) -> None:
        if self.heartbeat_address is None:
            return
        value = counter % 2 if self.coils else counter % 65536
        self._guard(self._write, self.heartbeat_address, value)

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "plc": f"{self.host}:{self.port}", "unit_id": self.unit_id,
                "output": "coil" if self.coils else "register", "stop_address": self.stop_address}
