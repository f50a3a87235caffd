"""Loopback ports and polling, for the tests that talk to servers, threads and processes."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.002, *, what: str = "the condition",
             proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``pred()`` is true; AssertionError after ``timeout``, or as soon as ``proc`` (a
    process the condition depends on) has exited."""
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with code {proc.returncode} while waiting for {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def sample(fn: Callable[[], object], seconds: float, interval: float = 0.02) -> list[object]:
    """``fn()`` every ``interval`` seconds for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(fn())
        time.sleep(interval)
    return out
