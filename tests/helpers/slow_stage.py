"""A stage module for the orphan test: its start-up takes long (as an inference worker loading its
model does) before any stage code runs, and it records its pid so the test can watch it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def run(name: str, pid_file: str, **_: Any) -> int:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)  # "loading the model"
    return 0
