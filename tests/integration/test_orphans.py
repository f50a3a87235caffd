"""A stage process never outlives its supervisor, even while it is still starting (loading a model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.net import wait_for
from tests.helpers.paths import ROOT
from tests.helpers.procs import alive

PARENT = """
import multiprocessing as mp, sys, time
from knitwatch.daemon.supervisor import run_stage
if __name__ == "__main__":
    p = mp.get_context("spawn").Process(
        target=run_stage, args=("tests.helpers.slow_stage", "infer.0", {"pid_file": sys.argv[1]}, "WARNING", "json"))
    p.start()
    time.sleep(600)
"""


def test_a_starting_stage_dies_with_its_killed_supervisor(tmp_path: Path) -> None:
    pid_file = tmp_path / "stage.pid"
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", timeout=60, what="stage start",
                 proc=parent)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)  # the supervisor is killed while the stage is still "loading"
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the stage process outlived its killed supervisor (orphan)"
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
