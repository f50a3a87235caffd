"""Learning a new fabric through the running daemon's API, end to end (slow: it trains a model).

The real daemon (`knitwatch run`, its HTTP API on a loopback port) inspects a small simulated camera.
`POST /api/learn` starts the job the web page starts: `knitwatch learn record --via-daemon` (the alert
stage records the frames), then `knitwatch learn train` (a few MSFlow steps, validation, installed, `use`),
both with the daemon's own settings. The job must go through recording -> training -> done, the new
version must be selected, and the daemon's frames must go to it (`running` in GET /api/models) - no restart.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from knitwatch.models.articles import Library
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.models import untrained_checkpoint
from tests.helpers.net import free_port, wait_for
from tests.helpers.procs import read_json_lines


def http(url: str, body: dict[str, Any] | None = None) -> Any:  # noqa: ANN401 - JSON
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_learn_a_fabric_through_the_running_daemon(tmp_path: Path) -> None:
    from knitwatch.daemon.cli.common import to_toml

    quiet = untrained_checkpoint(tmp_path / "quiet.ckpt", tile=48)  # flags nothing: every frame is recorded
    port = free_port()
    cfg = tmp_path / "knitwatch.toml"
    cfg.write_text(to_toml({
        "cameras": [{"id": "cam0", "source": "simulator", "fps": 4.0, "width": 256, "height": 128,
                     "position": {"source": "simulator"},
                     "simulator": {"texture": "pique", "pitch_px": 6.0, "speed_px": 24.0, "revolution_frames": 12}}],
        "inference": {"device": "cpu", "max_batch_tiles": 16, "max_wait_ms": 20},
        "store": {"path": str(tmp_path / "store")},
        "learn": {"library_dir": str(tmp_path / "library"), "min_revolutions": 3, "max_false_stops_per_hour": 1e6},
        "daemon": {"runtime_dir": str(tmp_path / "run"), "stats_interval_s": 1.0},
        "api": {"host": "127.0.0.1", "port": port},
    }))
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([*KNITWATCH, "--log-format", "json", "run", "--config", str(cfg), "--checkpoint",
                                 str(quiet)], stdout=logf, stderr=subprocess.STDOUT, env=clean_env())
    try:
        def ready() -> bool:
            try:
                return bool(http(url + "/api/stats").get("ready"))
            except OSError:  # not listening yet
                return False

        wait_for(ready, 240, 0.5, what="the daemon ready", proc=proc)
        job = http(url + "/api/learn", {"camera": "cam0", "article": "pique", "frames": 36,
                                        "model": "msflow-efficientnet-lite0", "steps": 20, "use": True})
        assert job["state"] in ("starting", "recording")
        states = []
        deadline = time.monotonic() + 800
        while True:
            job = http(url + "/api/learn")["jobs"][0]
            states.append(job["state"])
            if not job["running"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert job["state"] == "done", job
        assert "recording" in states and "training" in states
        assert job["recording"]["status"] == "done" and job["recording"]["revolutions"] >= 3
        lib = Library(tmp_path / "library")
        assert job["model"] == "pique@v1" and lib.selection()["cameras"]["cam0"]["model"]["id"] == "pique@v1"
        wait_for(lambda: http(url + "/api/models")["cameras"]["cam0"]["running"] == "pique@v1", 120, 0.5,
                 what="the daemon to inspect with the new model", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = read_json_lines(log_path)
    assert not [r for r in log if r.get("event") == "stage failed, restarting"], "a stage restarted"
    assert [r for r in log if r.get("event") == "camera changed model" and r.get("model") == "pique@v1"]
