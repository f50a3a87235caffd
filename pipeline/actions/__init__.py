"""Actions on a confirmed defect: drivers (modbus, opcua, command, log), chosen by ``[plc] driver``,
and the :class:`ActionRunner` worker thread that owns the latch, retries and the heartbeat."""

from __future__ import annotations

from pathlib import Path

import structlog

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, BrokenDriver, Driver, Job, LogDriver, event_env
from knitwatch.pipeline.actions.runner import ActionRunner
from knitwatch.pipeline.store.database import Store

log = structlog.get_logger(__name__)

__all__ = ["ActionError", "ActionRunner", "BrokenDriver", "Driver", "Job", "LogDriver", "build_driver", "build_runner",
           "event_env"]


def build_driver(plc: PlcConfig) -> Driver:
    """The driver for a ``[plc]`` section. A driver that cannot be built (a missing optional package)
    becomes a :class:`BrokenDriver`: every action fails loudly, inspection goes on."""
    kind = plc.driver
    try:
        if kind == "log":
            return LogDriver()
        if kind == "modbus":
            from knitwatch.pipeline.actions.modbus import ModbusDriver

            return ModbusDriver(plc)
        if kind == "opcua":
            from knitwatch.pipeline.actions.opcua import OpcUaDriver

            return OpcUaDriver(plc)
        if kind == "command":
            from knitwatch.pipeline.actions.command import CommandDriver

            return CommandDriver(plc)
    except ImportError as e:
        log.error("action driver cannot be loaded: every action will fail until this is fixed", driver=kind,
                  error=str(e))
        return BrokenDriver(kind, str(e))
    raise ValueError(f"unknown action driver {kind!r}")


def build_runner(plc: PlcConfig, store: Store | None = None, latch_dir: Path | None = None) -> ActionRunner:
    """The runner for a ``[plc]`` section (not started); ``latch_dir``: its latch file's folder."""
    return ActionRunner(build_driver(plc), plc, store=store, latch_dir=latch_dir)
