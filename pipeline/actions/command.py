"""The ``command`` driver: run a configured program per event and per acknowledge (GPIO relays,
sirens, messages), with the event's fields in ``KNITWATCH_*`` environment variables. Exit code 0
confirms the action; anything else is retried with back-off."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions.base import ActionError, Driver, Job


def _tail(data: bytes, n: int = 300) -> str:
    return data.decode("utf-8", "replace")[-n:].strip()


class CommandDriver(Driver):
    name = "command"

    def __init__(self, plc: PlcConfig) -> None:
        """Runs ``plc.command`` (the ``[plc]`` section) with ``plc.command_timeout_s``."""
        if not plc.command:
            raise ValueError("driver 'command' needs a program")
        self.command = [str(c) for c in plc.command]
        self.timeout_s = plc.command_timeout_s

    def notify(self, job: Job) -> dict[str, Any]:
        env = {**os.environ, **job.env}
        try:
            r = subprocess.run(self.command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise ActionError(f"command {self.command[0]} did not finish within {self.timeout_s} s") from e
        except OSError as e:
            raise ActionError(f"cannot run command {self.command[0]}: {e}") from e
        if r.returncode != 0:
            raise ActionError(f"command {self.command[0]} exited with code {r.returncode}: {_tail(r.stderr)}")
        return {"returncode": 0, "stdout": _tail(r.stdout)}

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "command": self.command[0]}
