"""``knitwatch demo`` end to end: it trains its model (tiny here), starts the simulated PLC (a real
pymodbus server), the real daemon processes and the HTTP API; defects land in the store and the
simulated PLC gets its stop; Ctrl-C ends it cleanly with a summary.

The fast test lowers the alert thresholds (through ``--config``, as a user can) so that a model
trained for a few steps is enough to make events: it checks the demo's wiring, not detection quality.
The slow test (``pytest -m slow``) runs the demo as a newcomer would, with a properly trained small
model and the default thresholds, until the scheduled hole stops the machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from knitwatch.config.settings import StoreConfig
from knitwatch.pipeline.store.database import Store, StoreError
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.net import free_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop_event(store_path: Path) -> dict | None:
    """The first stored stop event whose stop the PLC confirmed (read back), if any."""
    if not (store_path / "events.sqlite3").exists():
        return None
    try:
        store = Store.from_config(StoreConfig(path=store_path, fsync=False), create=False)
    except StoreError:
        return None
    try:
        for e in reversed(store.list_events(action="stop", limit=50)["items"]):
            full = store.get_event(e["id"])
            actions = full["record"].get("actions", []) if full else []
            if any(a.get("confirmed") and a.get("action") == "stop" for a in actions):
                return full
    finally:
        store.close()
    return None


def run_demo(tmp_path: Path, extra: list[str], *, timeout: float, until_stop: bool = True,
             check_api: bool = True) -> tuple[int, str, dict, dict | None, dict]:
    work = tmp_path / "demo"
    port = free_port()
    out_path = tmp_path / "stdout.txt"
    api: dict = {}
    with open(out_path, "w") as out:
        proc = subprocess.Popen([*KNITWATCH, "demo", "--workdir", str(work), "--port",
                                 str(port), "--quiet", "--duration", str(timeout), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path)
    event = None
    try:
        deadline = time.monotonic() + timeout + 60
        while time.monotonic() < deadline and proc.poll() is None:
            event = stop_event(work / "store")
            if event is not None or not until_stop:
                break
            time.sleep(0.5)
        if check_api and proc.poll() is None:
            base = f"http://127.0.0.1:{port}"
            for _ in range(40):  # the stats snapshot shows the camera after the next stats round
                code, body = _get(f"{base}/api/stats")
                api["stats"] = json.loads(body)
                if api["stats"]["cameras"]["demo"].get("inspected"):
                    break
                time.sleep(0.5)
            api["healthz"] = _get(f"{base}/healthz")[0]
            api["events"] = json.loads(_get(f"{base}/api/events")[1])
            api["metrics"] = _get(f"{base}/metrics")[1].decode()
            api["page"] = _get(f"{base}/")[0]
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = out_path.read_text()
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {}
    return rc, stdout, summary, event, api


def test_demo_runs_the_daemon_with_a_simulated_plc(tmp_path: Path) -> None:
    cfg = tmp_path / "fast.toml"
    cfg.write_text("[alert]\nimage_threshold = 0.001\npixel_threshold = 0.001\nmin_area_px = 1\nconfirm_k = 1\n"
                   "confirm_n = 1\ncooldown_frames = 5\n")
    rc, stdout, summary, event, api = run_demo(
        tmp_path, ["--config", str(cfg), "--steps", "4", "--train-frames", "6", "--fps", "1"], timeout=240)
    assert rc == 0, stdout[-3000:]
    assert (tmp_path / "demo" / "model.ckpt").is_file(), "the demo trains and keeps its model"
    assert "training the demo model" in stdout
    assert event is not None, stdout[-3000:]
    # the stop reached the simulated PLC (read back there) and the PLC saw it
    action = next(a for a in event["record"]["actions"] if a["action"] == "stop")
    assert action["driver"] == "modbus" and action["read_back"] and action["outputs"]["stop"]
    assert summary["stops"] >= 1 and summary["stop_output"] is True, summary
    assert summary["heartbeats"] >= 1, "the PLC heartbeat toggled"
    assert summary["events"] >= 1 and summary["inspected"] >= 1
    assert event["files"] == {"frame": True, "overlay": True, "mask": True, "thumb": True}
    # the web page and API were served by the daemon
    assert api["page"] == 200
    assert api["healthz"] == 200
    assert api["events"]["total"] >= 1
    assert api["stats"]["alarm"]["stop"] == ["demo"]
    assert 'knitwatch_frames_inspected_total{camera="demo"}' in api["metrics"]
    # the terminal: where to look, a status line and the defect
    assert "web page: http://127.0.0.1:" in stdout
    assert f"defect #{event['id']}: camera demo" in stdout
    assert "demo stopped after" in stdout


@pytest.mark.slow
def test_demo_as_a_newcomer_runs_it(tmp_path: Path) -> None:
    """Default thresholds, a small model trained by the demo: the scheduled hole (frame 12) stops the
    machine, the stop is for the hole, and a second start reuses the cached model."""
    rc, stdout, summary, event, api = run_demo(tmp_path, ["--steps", "150"], timeout=900)
    assert rc == 0, stdout[-3000:]
    assert event is not None, stdout[-3000:]
    kinds = {d["kind"] for d in event["record"]["truth"]["defects"]}
    assert "hole" in kinds, event["record"]["truth"]
    assert summary["stops"] >= 1
    assert summary["coverage"] is None or summary["coverage"] >= 0.9, summary
    rc, stdout, summary, _, _ = run_demo(tmp_path, [], timeout=20, until_stop=False, check_api=False)
    assert rc == 0 and "using the demo model" in stdout
