"""The ``knitwatch`` command as a user runs it: a real subprocess, without the caller's KNITWATCH_*
variables (they would change the settings)."""

from __future__ import annotations

import os
import subprocess
import sys

KNITWATCH = [sys.executable, "-m", "knitwatch.daemon"]
"""The command line of ``knitwatch`` (the installed script runs the same ``main``)."""


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without KNITWATCH_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNITWATCH_")}
    env.update(extra or {})
    return env


def knitwatch(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``knitwatch ARGS`` to the end; ``env``: KNITWATCH_* variables to set."""
    return subprocess.run([*KNITWATCH, *args], capture_output=True, text=True, env=clean_env(env), timeout=timeout)
