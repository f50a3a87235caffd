"""Actions on a confirmed defect: drivers (modbus, opcua, command, log), chosen by ``[plc] driver``,
and the :class:`ActionRunner` worker thread that owns the latch, retries and the heartbeat."""

from __future__ import annotations

from typing import Any

import structlog

from knitwatch.pipeline.actions.base import ActionError, BrokenDriver, Driver, Job, LogDriver, event_env
from knitwatch.pipeline.actions.runner import ActionRunner
from knitwatch.pipeline.store.database import Store

log = structlog.get_logger(__name__)

__all__ = ["ActionError", "ActionRunner", "BrokenDriver", "Driver", "Job", "LogDriver", "build_driver", "build_runner",
           "event_env"]


def build_driver(plc: dict[str, Any]) -> Driver:
    """The driver for a ``[plc]`` section (as a dict). A driver that cannot be built (a missing optional
    package) becomes a :class:`BrokenDriver`: every action fails loudly, inspection goes on."""
    kind = plc.get("driver", "log")
    try:
        if kind == "log":
            return LogDriver()
        if kind == "modbus":
            from knitwatch.pipeline.actions.modbus import ModbusDriver

            return ModbusDriver(plc.get("host", "127.0.0.1"), int(plc.get("port", 502)),
                                unit_id=int(plc.get("unit_id", 1)), output=plc.get("output", "coil"),
                                stop_address=int(plc.get("stop_address", 0)), alarm_address=plc.get("alarm_address"),
                                heartbeat_address=plc.get("heartbeat_address", 1),
                                stop_value=int(plc.get("stop_value", 1)), timeout_s=float(plc.get("timeout_s", 1.0)))
        if kind == "opcua":
            from knitwatch.pipeline.actions.opcua import OpcUaDriver

            return OpcUaDriver(plc["opcua_url"], plc["opcua_stop_node"], alarm_node=plc.get("opcua_alarm_node", ""),
                               heartbeat_node=plc.get("opcua_heartbeat_node", ""),
                               timeout_s=float(plc.get("timeout_s", 1.0)))
        if kind == "command":
            from knitwatch.pipeline.actions.command import CommandDriver

            return CommandDriver(plc["command"], float(plc.get("command_timeout_s", 10.0)))
    except ImportError as e:
        log.error("action driver cannot be loaded: every action will fail until this is fixed", driver=kind,
                  error=str(e))
        return BrokenDriver(kind, str(e))
    raise ValueError(f"unknown action driver {kind!r}")


def build_runner(plc: dict[str, Any], store: Store | None = None) -> ActionRunner:
    """The runner for a ``[plc]`` section (not started)."""
    return ActionRunner(build_driver(plc), store=store, heartbeat_s=float(plc.get("heartbeat_s", 1.0)),
                        heartbeat_idle_s=float(plc.get("heartbeat_idle_s", 10.0)),
                        retry_initial_s=float(plc.get("retry_initial_s", 0.2)),
                        retry_max_s=float(plc.get("retry_max_s", 5.0)))
