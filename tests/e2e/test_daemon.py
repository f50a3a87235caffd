"""The real daemon (`knitwatch run`: supervisor + stage processes over ZeroMQ) on the simulated
camera, with a tiny EfficientAD trained here on the same simulated fabric.

Checks: frames with large injected holes get defect decisions and defect-free frames get none;
`kill -9` of the inference worker -> it is restarted, the stream goes on, the restart is counted;
SIGTERM -> clean exit within 10 s and no process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from knitwatch.pipeline.offline.demo import train_simulator_model
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.net import free_port, wait_for
from tests.helpers.procs import alive, read_json_lines

W, H, TILE = 256, 128, 64
SPEED, REV = 24.0, 60


def sim_camera() -> dict:
    return {"id": "sim", "source": "simulator", "fps": 4.0, "width": W, "height": H,
            "simulator": {"pitch_px": 6.0, "speed_px": SPEED, "revolution_frames": REV, "seed": 3,
                          "defects": [{"kind": "hole", "frame": 20, "size": 3.0},
                                      {"kind": "hole", "frame": 70, "size": 3.0}]}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientAD-S on 64 px tiles of defect-free simulated frames (cutlines included), other seed."""
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    return train_simulator_model(path, width=W, height=H, speed_px=SPEED, revolution_frames=REV, tile=TILE,
                                 frames=30, steps=60, distill_steps=30, seed=11, progress=False)


def write_config(tmp: Path) -> Path:
    cfg = {
        "cameras": [sim_camera()],
        "inference": {"device": "cpu", "max_batch_tiles": 16, "max_wait_ms": 20},
        "alert": {"confirm_k": 2, "confirm_n": 3, "min_area_px": 30, "cooldown_frames": 20},
        "store": {"path": str(tmp / "store")},
        "daemon": {"runtime_dir": str(tmp / "run"), "stats_interval_s": 1.0, "stall_s": 10.0, "drain_s": 3.0},
        "logging": {"level": "INFO"},
    }
    path = tmp / "knitwatch.toml"
    path.write_text(json_to_toml(cfg))
    return path


def json_to_toml(cfg: dict) -> str:
    from knitwatch.daemon.cli.common import to_toml

    return to_toml(cfg)


def test_daemon_detects_restarts_and_stops_cleanly(tmp_path: Path, tiny_model: Path) -> None:
    cfg = write_config(tmp_path)
    decisions = tmp_path / "decisions.jsonl"
    log_path = tmp_path / "daemon.log"
    env = clean_env()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            [*KNITWATCH, "--log-format", "json", "run", "--config", str(cfg),
             "--checkpoint", str(tiny_model), "--decisions-log", str(decisions)],
            stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
    try:
        def started() -> dict[str, int]:
            return {r["stage_name"]: r["child_pid"] for r in read_json_lines(log_path)
                    if r.get("event") == "stage spawned"}

        wait_for(lambda: len(read_json_lines(decisions)) >= 45, 240, 0.25, what="45 inspected frames", proc=proc)
        first_infer = started()["infer.0"]
        os.kill(first_infer, signal.SIGKILL)
        n_at_kill = len(read_json_lines(decisions))
        wait_for(lambda: started().get("infer.0") not in (None, first_infer), 60, 0.25, what="infer restart", proc=proc)
        wait_for(lambda: len(read_json_lines(decisions)) >= max(n_at_kill + 30, 100), 240, 0.25,
                 what="frames after restart", proc=proc)
        wait_for(lambda: any(r.get("event") == "stats" and r.get("restarts", {}).get("infer.0") == 1
                             for r in read_json_lines(log_path)), 30, 0.25, what="the restart in the stats", proc=proc)
        all_pids = set()
        for r in read_json_lines(log_path):
            if r.get("event") == "stage spawned":
                all_pids.add(r["child_pid"])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log_path.read_text()[-3000:]
    assert took < 10.0
    assert not [p for p in all_pids if alive(p)], "stage processes left behind"
    assert len(all_pids) >= 5  # alert, tiler, infer, capture, and the restarted infer

    rows = read_json_lines(decisions)
    seqs = [r["seq"] for r in rows]
    assert len(set(seqs)) == len(seqs)
    def visible_area(d: dict) -> int:
        x0, y0, x1, y1 = d["box"]
        return (x1 - x0) * (y1 - y0)

    # frames showing most of a hole (not a sliver entering or leaving the view)
    with_hole = [r for r in rows if any(d["kind"] == "hole" and visible_area(d) >= 400 for d in r["truth"]["defects"])]
    clean = [r for r in rows if not r["truth"]["defects"]]
    assert with_hole and clean
    hit = np.mean([r["defect"] for r in with_hole])
    false = np.mean([r["defect"] for r in clean])
    assert hit >= 0.6, f"only {hit:.0%} of frames with a hole were flagged"
    assert false <= 0.05, f"{false:.0%} of defect-free frames were flagged"
    assert not [r for r in clean if r["event"]], "an event fired on defect-free fabric"
    assert [r for r in with_hole if r["event"]], "no event for the holes"
    cutline = [r for r in clean if r["truth"]["cutline"]]
    assert cutline and not any(r["defect"] for r in cutline), "cutline frames were flagged"


def test_remote_worker_over_tcp(tmp_path: Path, tiny_model: Path) -> None:
    """No local inference worker: frames are inspected by a `knitwatch worker` process over tcp://,
    the link secured with CURVE keys made by `knitwatch keys generate`."""
    tiles_ep, results_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    for name in ("daemon", "w1"):
        subprocess.run([*KNITWATCH, "keys", "generate", "--out", str(keys), "--name", name], check=True,
                       capture_output=True, env=clean_env(), timeout=60)
    authorized.mkdir()
    (authorized / "w1.key").write_bytes((keys / "w1.key").read_bytes())
    cfg = write_config(tmp_path)
    text = cfg.read_text().replace("[inference]\n", f'[inference]\nworkers = 0\ntiles_endpoint = "{tiles_ep}"\n'
                                   f'results_endpoint = "{results_ep}"\n'
                                   f'server_secret_key = "{keys}/daemon.key_secret"\n'
                                   f'authorized_keys_dir = "{authorized}"\n')
    cfg.write_text(text)
    decisions = tmp_path / "decisions.jsonl"
    env = clean_env()
    base = [*KNITWATCH, "--log-format", "json"]
    with open(tmp_path / "daemon.log", "w") as dlog, open(tmp_path / "worker.log", "w") as wlog:
        daemon = subprocess.Popen([*base, "run", "--config", str(cfg), "--checkpoint", str(tiny_model),
                                   "--decisions-log", str(decisions)], stdout=dlog, stderr=subprocess.STDOUT, env=env)
        worker = subprocess.Popen([*base, "worker", "--checkpoint", str(tiny_model), "--tiles", tiles_ep,
                                   "--results", results_ep, "--name", "w1", "--key", str(keys / "w1.key_secret"),
                                   "--server-key", str(keys / "daemon.key")], stdout=wlog, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        wait_for(lambda: len(read_json_lines(decisions)) >= 10, 180, 0.25,
                 what="10 frames inspected by the remote worker", proc=daemon)
        assert worker.poll() is None
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    finally:
        for p in (daemon, worker):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    spawned = [r["stage_name"] for r in read_json_lines(tmp_path / "daemon.log") if r.get("event") == "stage spawned"]
    assert not [s for s in spawned if s.startswith("infer")]
    assert any(r.get("event") == "inference worker ready" for r in read_json_lines(tmp_path / "worker.log"))
    assert any(r.get("event") == "worker link authenticated" and r.get("key_name") == "w1"
               for r in read_json_lines(tmp_path / "daemon.log"))
