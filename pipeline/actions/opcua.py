"""The ``opcua`` driver (asyncua, the optional extra ``knitwatch[opcua]``): write Boolean nodes -
stop (True while a stop is latched), optional alarm, optional heartbeat (toggles) - and read the
stop and alarm nodes back to confirm."""

from __future__ import annotations

from typing import Any

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, Driver

MISSING = "driver 'opcua' needs the optional package asyncua: pip install 'knitwatch[opcua]'"


class OpcUaDriver(Driver):
    name = "opcua"
    has_outputs = True

    def __init__(self, plc: PlcConfig) -> None:
        """The server at ``plc.opcua_url`` and its ``opcua_*_node`` nodes (the ``[plc]`` section)."""
        try:
            from asyncua import ua
            from asyncua.sync import ThreadLoop
        except ImportError as e:
            raise ImportError(MISSING) from e
        self.ua = ua
        self.url = plc.opcua_url
        self.node_ids = {"stop": plc.opcua_stop_node, "alarm": plc.opcua_alarm_node,
                         "heartbeat": plc.opcua_heartbeat_node}
        self.has_heartbeat = bool(plc.opcua_heartbeat_node)
        self.timeout_s = plc.timeout_s
        self.tloop = ThreadLoop(timeout=max(5.0, 4 * self.timeout_s))
        self.tloop.start()
        self.client: Any = None
        self.nodes: dict[str, Any] = {}

    def connect(self) -> None:
        if self.client is not None:
            return
        from asyncua.sync import Client, ThreadLoop

        if not self.tloop.is_alive():  # after shutdown(): a new loop thread
            self.tloop = ThreadLoop(timeout=max(5.0, 4 * self.timeout_s))
            self.tloop.start()
        client = Client(self.url, timeout=self.timeout_s, tloop=self.tloop)
        try:
            client.connect()
            self.nodes = {k: client.get_node(v) for k, v in self.node_ids.items() if v}
        except Exception as e:  # asyncua raises many kinds (OSError, TimeoutError, ua.UaError ...)
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001, S110 - best effort on a half-open connection
                pass
            raise ActionError(f"cannot connect to the OPC UA server {self.url}: {type(e).__name__}: {e}") from e
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
            self.client = None

    def shutdown(self) -> None:
        self.close()
        self.tloop.stop()

    def _do(self, fn: Any) -> Any:  # noqa: ANN401
        self.connect()
        try:
            return fn()
        except ActionError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - any failure means: not confirmed, reconnect and retry
            self.close()
            raise ActionError(f"OPC UA {self.url}: {type(e).__name__}: {e}") from e

    def _write(self, key: str, value: bool) -> None:
        ua = self.ua
        self.nodes[key].write_value(ua.DataValue(ua.Variant(bool(value), ua.VariantType.Boolean)))

    def set_outputs(self, stop: bool, alarm: bool) -> dict[str, Any]:
        want = {"stop": stop, "alarm": alarm or stop}

        def do() -> dict[str, Any]:
            for key, value in want.items():
                if key in self.nodes:
                    self._write(key, value)
            for key, value in want.items():
                if key in self.nodes and bool(self.nodes[key].read_value()) != value:
                    raise ActionError(f"OPC UA node {self.node_ids[key]} does not hold {value} after writing it")
            return {"stop_output": int(stop), "read_back": True}

        return self._do(do)

    def read_outputs(self) -> tuple[bool, bool]:
        def do() -> tuple[bool, bool]:
            stop = bool(self.nodes["stop"].read_value())
            alarm = bool(self.nodes["alarm"].read_value()) if "alarm" in self.nodes else stop
            return stop, alarm

        return self._do(do)

    def heartbeat(self, counter: int) -> None:
        if "heartbeat" in self.node_ids and self.node_ids["heartbeat"]:
            self._do(lambda: self._write("heartbeat", bool(counter % 2)))

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "url": self.url, "stop_node": self.node_ids["stop"]}
