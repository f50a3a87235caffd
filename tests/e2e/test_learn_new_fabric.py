"""The machine changes article; knitwatch learns the new fabric on the machine and switches to it.

The real daemon (`knitwatch run`) inspects simulated jersey with a small jersey model. At frame 16 the
simulated machine changes to pique of another yarn (9 px loops, darker): the jersey model stops the
machine for nothing on it. `knitwatch learn record` (through the running daemon) records the pique,
`knitwatch learn train --use` trains, validates and installs a pique model and selects it for the
camera; the daemon switches without a restart. Then the scheduled defects on the pique are stopped by
the pique model, and the false stops are gone.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from knitwatch.models.articles import Library
from knitwatch.pipeline.offline.demo import train_simulator_model
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.net import wait_for
from tests.helpers.procs import read_json_lines

W, H, SPEED, REV, CHANGE = 256, 128, 24.0, 12, 16


def config(tmp: Path) -> Path:
    from knitwatch.daemon.cli.common import to_toml

    defects = [{"kind": ("hole", "oil_stain")[i % 2], "frame": f, "size": 2.0, "intensity": 1.5}
               for i, f in enumerate(range(300, 3000, 16))]
    cfg = {
        "cameras": [{"id": "cam0", "source": "simulator", "fps": 4.0, "width": W, "height": H,
                     "position": {"source": "simulator"},
                     "simulator": {"pitch_px": 6.0, "speed_px": SPEED, "revolution_frames": REV, "seed": 3,
                                   "change_frame": CHANGE, "change_texture": "pique", "change_pitch_px": 9.0,
                                   "change_brightness": 100.0, "defects": defects}}],
        "inference": {"device": "cpu", "max_batch_tiles": 16, "max_wait_ms": 20},
        "alert": {"confirm_k": 2, "confirm_n": 3, "min_area_px": 30},
        "store": {"path": str(tmp / "store"), "fsync": False},
        "learn": {"library_dir": str(tmp / "library"), "min_revolutions": 3, "max_false_stops_per_hour": 1e6},
        "daemon": {"runtime_dir": str(tmp / "run"), "stats_interval_s": 1.0},
        "api": {"enabled": False},
        "logging": {"level": "INFO"},
    }
    path = tmp / "knitwatch.toml"
    path.write_text(to_toml(cfg))
    return path


def stop_rate(rows: list[dict]) -> tuple[int, int]:
    """(false stops, frames): stop events on frames showing no defect."""
    return sum(1 for r in rows if r["event"] and r.get("action") == "stop" and not r["truth"]["defects"]), len(rows)


@pytest.mark.timeout(900)
def test_the_machine_changes_article_and_knitwatch_learns_it(tmp_path: Path) -> None:
    jersey = train_simulator_model(tmp_path / "jersey.ckpt", width=W, height=H, speed_px=SPEED, revolution_frames=REV,
                                   tile=64, frames=24, steps=60, distill_steps=30, seed=11, progress=False)
    cfg = config(tmp_path)
    decisions = tmp_path / "decisions.jsonl"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([*KNITWATCH, "--log-format", "json", "run", "--config", str(cfg), "--checkpoint",
                                 str(jersey), "--decisions-log", str(decisions)],
                                stdout=logf, stderr=subprocess.STDOUT, env=clean_env())
    try:
        def rows() -> list[dict]:
            return read_json_lines(decisions)

        wait_for(lambda: sum(r["truth"]["texture"] == "pique" for r in rows()) >= 24, 300, 0.25,
                 what="the jersey model on the new fabric", proc=proc)
        record = subprocess.run([*KNITWATCH, "learn", "record", "--config", str(cfg), "--camera", "cam0",
                                 "--article", "pique", "--frames", "24", "--via-daemon", "--quiet", "--json"],
                                capture_output=True, text=True, env=clean_env(), timeout=300, check=False)
        assert record.returncode == 0, record.stderr[-2000:]
        train = subprocess.run([*KNITWATCH, "learn", "train", "--config", str(cfg), "--article", "pique",
                                "--model", "msflow-efficientnet-lite0", "--steps", "20", "--no-recall", "--use",
                                "--camera", "cam0", "--json", "--quiet"],
                               capture_output=True, text=True, env=clean_env(), timeout=600, check=False)
        assert train.returncode == 0, train.stderr[-2000:]
        installed = json.loads(train.stdout)["model"]
        assert installed == "pique@v1" and Library(tmp_path / "library").selection()["cameras"]["cam0"]["model"][
            "id"] == installed

        def stopped_by_new_model() -> bool:
            return any(r.get("model") == installed and r["event"] and r.get("action") == "stop"
                       and r["truth"]["defects"] for r in rows())

        wait_for(stopped_by_new_model, 300, 0.5, what="a defect on the pique stopped by the pique model", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = read_json_lines(log_path)
    assert not [r for r in log if r.get("event") == "stage failed, restarting"], "a stage restarted"
    all_rows = rows()
    before = [r for r in all_rows if r["truth"]["texture"] == "pique" and r.get("model") != installed
              and not r["truth"]["defects"]]
    after = [r for r in all_rows if r.get("model") == installed]
    false_before, n_before = stop_rate(before)
    false_after, n_after = stop_rate(after)
    assert false_before >= 1, "the jersey model should stop the machine for nothing on the new fabric"
    assert false_after / n_after < false_before / n_before, (false_after, n_after, false_before, n_before)
    recording = json.loads(record.stdout)
    assert recording["revolutions"] >= 3 and recording["flagged_kept"] > 0  # the jersey model flagged the pique
