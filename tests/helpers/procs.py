"""Watching real processes and what they write: liveness by pid, JSON-lines logs being written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead and waiting for its reaper, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON records of a log file that may still be written (a partial last line is skipped)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line being written
    return out
