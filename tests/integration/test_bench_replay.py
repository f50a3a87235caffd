"""``knitwatch bench detection --record DIR`` / ``--replay DIR``: the decision layer replayed over recorded
model outputs decides exactly as the live alert stage does for the same stream; settings given with
``--set`` change the outcome; bad input is named and exits 2.

A tiny simulated camera (128x64 frames) and an untrained EfficientAD-S (real weights, seeded) keep it
fast; its maps are noise to the decision layer, so the thresholds are set from the recorded maps to
make regions, tracks and events happen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, SeverityClassConfig
from knitwatch.daemon.bench.detection import detection_report
from knitwatch.daemon.bench.replay import MANIFEST, alert_settings, frames_of, load_manifest, replay
from knitwatch.pipeline import wire
from tests.helpers.cli import knitwatch
from tests.helpers.models import untrained_checkpoint
from tests.helpers.stages import StageUnderTest

FRAMES = 60


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A recording of 60 frames (scheduled defects, the image position estimator), and thresholds at
    which the untrained model's maps make regions in some frames but not all."""
    tmp = tmp_path_factory.mktemp("replay")
    ckpt = untrained_checkpoint(tmp / "m.ckpt", tile=64)
    rec = tmp / "rec"
    r = knitwatch("bench", "detection", str(ckpt), "--record", str(rec), "--frames", str(FRAMES), "--size", "128x64",
                  "--map-floor", "0", "--device", "cpu", "--backend", "torch", "--batch-frames", "8", "--json",
                  timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["frames"] == FRAMES and summary["map_floor"] == 0
    assert "recorded" in r.stderr or "recording" in r.stderr  # progress on stderr
    manifest = load_manifest(rec)
    frames = list(frames_of(rec, manifest))
    assert [f.seq for f in frames] == list(range(FRAMES))
    assert all(f.amap.shape == (64, 128) and "pos" in f.head and "truth" in f.head for f in frames)
    # the untrained model's maps are flat but for the cutline and the defects: the top tenth of the pixels
    # makes regions in about half of the frames
    threshold = float(np.quantile(np.concatenate([f.amap.ravel() for f in frames]), 0.9))
    return {"dir": rec, "ckpt": ckpt, "manifest": manifest, "frames": frames, "pixel": threshold,
            "image": threshold}


def _sets(rec: dict[str, Any], **extra: Any) -> list[str]:  # noqa: ANN401
    values = {"pixel_threshold": rec["pixel"], "image_threshold": rec["image"], "min_area_px": 4, **extra}
    out: list[str] = []
    for k, v in values.items():
        out += ["--set", f"alert.{k}={json.dumps(v)}"]
    return out


def _replay(rec: dict[str, Any], *args: str) -> dict[str, Any]:
    r = knitwatch("bench", "detection", "--replay", str(rec["dir"]), "--json", *args, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _normalised(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their latency and the live stage's model id and capture time (the replay judges with
    the recording's one model), event ids numbered by first appearance (the live stage without a store
    numbers them -1, -2 ...; the replay 1, 2 ...)."""
    ids: dict[Any, int] = {}

    def eid(v: Any) -> Any:  # noqa: ANN401
        return None if v is None else ids.setdefault(v, len(ids) + 1)

    out = []
    for r in sorted(rows, key=lambda r: r["seq"]):
        r = {k: v for k, v in r.items() if k not in ("latency_ms", "model", "t_wall_ns")}
        if "event_id" in r:
            r["event_id"] = eid(r["event_id"])
            r["event_ids"] = [eid(e) for e in r["event_ids"]]
        r["tracks"] = [{**t, "event_id": eid(t["event_id"])} if "event_id" in t else t for t in r["tracks"]]
        out.append(r)
    return out


def test_replay_decides_as_the_live_alert_stage(recording: dict[str, Any], tmp_path: Path) -> None:
    rec = recording
    severity = [{"name": "big", "action": "stop", "min_area_px": 40}, {"name": "small", "action": "alarm"}]
    replay_log = tmp_path / "replay.jsonl"
    report = _replay(rec, *_sets(rec, confirm_k=2, confirm_n=3, severity=severity), "--decisions-log", str(replay_log))
    replayed = [json.loads(line) for line in replay_log.read_text().splitlines()]
    assert report["frames_inspected"] == FRAMES and report["events"] > 0  # the stream makes decisions to compare
    assert 0 < sum(r["confirmed"] for r in replayed) < FRAMES

    # the live alert stage, a real process, fed the same stream of results over ZeroMQ
    live_log = tmp_path / "live.jsonl"
    alert = AlertConfig(pixel_threshold=rec["pixel"], image_threshold=rec["image"], min_area_px=4, confirm_k=2,
                        confirm_n=3, severity=[SeverityClassConfig(**c) for c in severity], decisions_log=live_log)
    ep = f"ipc://{tmp_path}/results.sock"
    stage = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.alert", "alert", results_endpoint=ep,
                           thresholds=rec["manifest"]["model"]["thresholds"], alert=alert,
                           cameras=[CameraConfig(id="bench")], store=None)
    try:
        push = stage.socket(zmq.PUSH, ep, bind=False)  # sends time out (SEND_TIMEOUT_MS), never hang
        image = np.full((64, 128), 128, np.uint8)
        for f in rec["frames"]:
            head = {"cam": "bench", "seq": f.seq, "epoch": 1, "t_wall_ns": time.time_ns(),
                    "t_mono_ns": time.monotonic_ns(), "image_score": f.image_score,
                    "tile_scores": [float(s) for s in f.tile_scores], "pos": f.head["pos"], "truth": f.head["truth"]}
            wire.send(push, "result", head, [f.amap, image])
        stage.wait_stats(lambda s: s.get("inspected", 0) >= FRAMES, timeout=60)
    finally:
        stage.stop()
    live = [json.loads(line) for line in live_log.read_text().splitlines()]
    assert len(live) == FRAMES
    assert _normalised(replayed) == _normalised(live)


def _replay_here(rec: dict[str, Any], **sets: Any) -> dict[str, Any]:  # noqa: ANN401
    """The replay the command runs (in this process: no start-up per setting), with its report."""
    values = {"pixel_threshold": rec["pixel"], "image_threshold": rec["image"], "min_area_px": 4, **sets}
    rows, used = replay(rec["dir"], rec["manifest"], alert_settings(AlertConfig(), values))
    assert len(rows) == FRAMES
    return {**detection_report(rows, fps=2.0, min_area_px=4), **used}


def test_settings_change_the_outcome(recording: dict[str, Any]) -> None:
    rec = recording
    allstop = [{"name": "defect", "action": "stop"}]
    base = _replay_here(rec, severity=allstop)
    eager = _replay_here(rec, severity=allstop, confirm_k=1, confirm_n=1)
    strict = _replay_here(rec, severity=allstop, confirm_k=4, confirm_n=4)
    top = float(max(f.amap.max() for f in rec["frames"]))
    above = _replay_here(rec, severity=allstop, image_threshold=top + 1)
    assert base["confirm"] == "2 of 3" and eager["confirm"] == "1 of 1" and strict["confirm"] == "4 of 4"
    # the stream has defect-free frames, the untrained model no idea of defects: every stop is false or lucky
    assert eager["stop_events"] >= base["stop_events"] >= strict["stop_events"]
    assert eager["stop_events"] > strict["stop_events"]
    assert above["stop_events"] == 0 and above["events"] == 0
    # the default severity classes (an alarm below 200 px and 2x the threshold): no more stops than all-stop
    default = _replay_here(rec)
    assert default["severity"] == ["major:stop", "intense:stop", "minor:alarm"]
    assert default["stop_events"] <= base["stop_events"] and default["events"] == base["events"]


def _fails(*args: str) -> str:
    r = knitwatch("bench", "detection", *args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def test_bad_input_exits_2(recording: dict[str, Any], tmp_path: Path) -> None:
    rec = recording
    assert "no such folder" in _fails("--replay", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "not a recording" in _fails("--replay", str(tmp_path / "empty"))
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((rec["dir"] / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    assert "format version 99" in _fails("--replay", str(old))
    other = untrained_checkpoint(tmp_path / "other.ckpt", tile=64, image_threshold=5.0)
    assert "another model" in _fails(str(other), "--replay", str(rec["dir"]))
    assert "alert.nope" in _fails("--replay", str(rec["dir"]), "--set", "alert.nope=1")
    assert "confirm_k" in _fails("--replay", str(rec["dir"]), "--set", "alert.confirm_k=5")
    assert "alert.KEY=VALUE" in _fails("--replay", str(rec["dir"]), "--set", "store.path=x")
    floored = tmp_path / "floored"
    floored.mkdir()
    for f in rec["dir"].iterdir():
        (floored / f.name).write_bytes(f.read_bytes())
    (floored / MANIFEST).write_text(json.dumps({**manifest, "map_floor": 0.5}))
    assert "map floor" in _fails("--replay", str(floored), "--set", "alert.pixel_threshold=0.25")
    assert "not an empty folder" in _fails(str(rec["ckpt"]), "--record", str(rec["dir"]), "--frames", "60")
    assert "needs the model" in _fails("--record", str(tmp_path / "r2"))
    assert "one at a time" in _fails(str(rec["ckpt"]), "--record", str(tmp_path / "r3"), "--replay", str(rec["dir"]))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()  # nothing half-written
    assert "--hours" in _fails(str(rec["ckpt"]), "--record", str(tmp_path / "r4"), "--hours", "-1")
    assert not (tmp_path / "r4").exists()


def test_reposition_recomputes_the_recorded_positions(recording: dict[str, Any]) -> None:
    """``--reposition``: this version's estimator over the re-rendered simulator frames gives the recorded
    positions (the recording was made by this version) and so the same decisions."""
    rec = recording
    alert = alert_settings(AlertConfig(), {"pixel_threshold": rec["pixel"], "image_threshold": rec["image"],
                                           "min_area_px": 4})
    rows, _ = replay(rec["dir"], rec["manifest"], alert)
    again, _ = replay(rec["dir"], rec["manifest"], alert, reposition=True)
    assert [r.get("pos") for r in again] == [r.get("pos") for r in rows]
    assert sum(r.get("pos") is not None for r in again) > FRAMES // 2
    assert _normalised(again) == _normalised(rows)
