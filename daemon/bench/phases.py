"""What the benches that run the daemon read while it runs: the decisions log as it grows, and the
figures of a phase of the run (frames, coverage, drops, latency) from it and the camera's counters."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class DecisionsTail:
    """Reads the alert stage's decisions log as it grows (a partial last line is kept for the next read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""

    def rows(self) -> list[dict[str, Any]]:
        """The decisions written since the last read."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        out = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def read(self) -> list[float]:
        """The capture -> decision latencies (ms) of the frames decided since the last read."""
        return [lat for r in self.rows() if (lat := latency_ms(r)) is not None]


def latency_ms(row: dict[str, Any]) -> float | None:
    lat = row.get("latency_ms")
    if isinstance(lat, dict):
        lat = lat.get("capture_to_decision")
    return float(lat) if isinstance(lat, int | float) else None


def frame_time(row: dict[str, Any]) -> float | None:
    """A decision's frame capture time (s since the epoch), when the log has it."""
    t = row.get("t_wall_ns")
    return t / 1e9 if isinstance(t, int) else None


def phase(name: str, rows: list[dict[str, Any]], samples: list[dict[str, Any]], t0: float,
          t1: float) -> dict[str, Any]:
    """A phase of a run from ``t0`` to ``t1`` (s since the epoch): the decisions of frames captured in it
    (``rows``, each with ``t``: its capture time), and from the camera's counters sampled during the run
    (``samples``: ``{"t", "captured", "dropped"}``, cumulative) the frames captured and dropped in it."""
    part = [r for r in rows if t0 <= r["t"] < t1]
    s0 = min(samples, key=lambda s: abs(s["t"] - t0)) if samples else None
    s1 = min(samples, key=lambda s: abs(s["t"] - t1)) if samples else None
    captured = (s1["captured"] - s0["captured"]) if s0 and s1 else None
    dropped = (s1["dropped"] - s0["dropped"]) if s0 and s1 else None
    lat = [v for r in part if (v := latency_ms(r)) is not None]
    return {
        "window": name, "seconds": round(t1 - t0, 1), "captured": captured, "inspected": len(part),
        "dropped_at_capture": dropped,
        "coverage": round(min(1.0, len(part) / captured), 3) if captured else None,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if lat else None,
    }


def run_daemon_logged(settings: Any, ckpt: dict[str, Any], log_path: Path, *,  # noqa: ANN401 - Settings
                      on_report: Callable[[Any], bool], duration_s: float, log_level: str = "INFO",
                      bench_log_format: str = "auto") -> int:
    """Run the daemon (the supervisor in this process) with every process's log in ``log_path``;
    ``on_report(supervisor)`` is called after each stats report once the daemon is ready, and ends the
    run (the daemon's own orderly shutdown) by returning True. Returns the daemon's exit code."""
    from knitwatch.daemon.logs import setup_logging
    from knitwatch.daemon.supervisor import Supervisor

    class BenchSupervisor(Supervisor):
        def _report(self) -> None:
            super()._report()
            if self.ready and self.stop_signal is None and on_report(self):
                self.stop_signal = signal.SIGTERM

    sys.stderr.flush()
    saved_err = os.dup(2)
    logf = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    os.dup2(logf.fileno(), 2)  # the stage processes inherit stderr: their logs go to the file
    try:
        setup_logging("supervisor", level="WARNING", fmt="json")
        sup = BenchSupervisor(settings, checkpoint=ckpt, log_level=log_level, log_format="json")
        return int(sup.run(duration_s=duration_s))
    finally:
        sys.stderr.flush()
        os.dup2(saved_err, 2)
        os.close(saved_err)
        logf.close()
        setup_logging("bench", level="WARNING", fmt=bench_log_format)
