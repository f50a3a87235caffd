"""Frames lost in flight when a stage dies are counted (issue 15, case 13).

The real daemon (``knitwatch run``: capture, tiler, inference worker and alert processes over ZeroMQ)
with an inference worker that collects frames for 4 s before it runs a batch: the test kills it with
SIGKILL while it holds frames. The supervisor counts what the worker had taken and not passed on (its
last heartbeat's counters) in the restart's log line and in the statistics; the count never exceeds the
frames that really never got a decision.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from knitwatch.daemon.supervisor import frames_held
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.models import untrained_checkpoint
from tests.helpers.net import wait_for
from tests.helpers.procs import read_json_lines


def write_config(tmp: Path) -> Path:
    path = tmp / "knitwatch.toml"
    path.write_text(
        '[[cameras]]\nid = "c"\nsource = "simulator"\nfps = 8\nwidth = 128\nheight = 64\n'
        "[inference]\ndevice = \"cpu\"\nmax_batch_tiles = 64\nmax_wait_ms = 4000\n"
        f'[store]\npath = "{tmp / "store"}"\nfsync = false\n'
        f'[daemon]\nruntime_dir = "{tmp / "run"}"\nstats_interval_s = 0.5\n'
        "[api]\nenabled = false\n"
    )
    return path


def test_frames_held_by_a_killed_worker_are_counted_lost(tmp_path: Path) -> None:
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt", tile=64)  # no frame is a defect: every frame is decided
    decisions = tmp_path / "decisions.jsonl"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([*KNITWATCH, "--log-format", "json", "run", "--config", str(write_config(tmp_path)),
                                 "--checkpoint", str(ckpt), "--decisions-log", str(decisions)],
                                stdout=logf, stderr=subprocess.STDOUT, env=clean_env())
    try:
        def decided() -> int:
            return len(read_json_lines(decisions))

        def infer_pid() -> int | None:
            return next((r["child_pid"] for r in reversed(read_json_lines(log_path))
                         if r.get("event") == "stage spawned" and r.get("stage_name") == "infer.0"), None)

        wait_for(lambda: decided() >= 1, 180, 0.1, what="the first batch decided", proc=proc)
        n = decided()
        wait_for(lambda: decided() > n, 30, 0.05, what="the next batch decided", proc=proc)
        time.sleep(2.5)  # the worker collects the next batch's frames (4 s)
        first = infer_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: any(r.get("event") == "stage failed, restarting" for r in read_json_lines(log_path)),
                 30, 0.1, what="the restart", proc=proc)
        wait_for(lambda: infer_pid() != first, 60, 0.1, what="a new worker", proc=proc)
        m = decided()
        wait_for(lambda: decided() > m, 120, 0.1, what="frames decided after the restart", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = read_json_lines(log_path)
    failed = [r for r in logs if r.get("event") == "stage failed, restarting"]
    assert [r["stage_name"] for r in failed] == ["infer.0"]
    lost = failed[0]["frames_lost_in_flight"]
    assert lost >= 5, "about 20 frames were waiting for the batch"
    final = next(r for r in logs if r.get("event") == "final stats")
    assert final["lost_in_flight"] == {"total": lost, "by_stage": {"infer.0": lost}}
    assert any(r.get("event") == "stats" and r.get("lost_in_flight", {}).get("total") == lost for r in logs)
    # never more than the frames that really got no decision (the capture's own drops aside)
    seqs = {r["seq"] for r in read_json_lines(decisions)}
    missing = set(range(min(seqs), max(seqs) + 1)) - seqs
    assert lost <= len(missing), (lost, len(missing))


def test_frames_held_by_layer() -> None:
    assert frames_held("capture", {"captured": 10, "sent": 7, "dropped": 2}) == 1
    assert frames_held("tiler", {"frames": 9, "sent": 8, "waiting_frames": 1}) == 1
    assert frames_held("infer", {"taken": 12, "frames": 4, "bad_message_reasons": {"tiles.model": 1},
                                 "lost_at_shutdown": 2}) == 5
    assert frames_held("alert", {"taken": 5, "inspected": 4, "unknown_camera": 1}) == 0
    # odd values (a stage's free keys are only type-checked): not a count, never negative
    assert frames_held("infer", {"taken": "9", "frames": True}) == 0
    assert frames_held("capture", {"captured": 1, "sent": 5}) == 0
    assert frames_held("infer", {}) == 0
