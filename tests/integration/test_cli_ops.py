"""``knitwatch defects list|show|export``, ``status`` and ``doctor`` against real parts: a real store
with events and pictures, the real API on a uvicorn server, a real pymodbus PLC, real cameras (the
simulator, an image folder), a real (untrained but complete) model checkpoint. The commands run
in-process through the CLI's ``main`` (what the ``knitwatch`` script calls)."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from knitwatch.config import Settings
from knitwatch.config.settings import StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.cli.common import to_toml
from knitwatch.daemon.cli.main import main
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.store.database import Store
from knitwatch.pipeline.store.queries import parse_time
from tests.helpers.api import EVENTS, SNAPSHOT, TOKEN, make_settings
from tests.helpers.models import untrained_checkpoint
from tests.helpers.net import free_port


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def setup(tmp_path: Path, populated: tuple[Settings, list[int]], plc: SimulatedPlc):
    settings, ids = populated
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i:03d}.png"), np.full((64, 96), 100 + i, np.uint8))
    cfg = {
        "cameras": [{"id": "cam0", "source": "simulator", "width": 256, "height": 128},
                    {"id": "cam1", "source": "folder", "uri": str(frames)}],
        "model": {"checkpoint": str(untrained_checkpoint(tmp_path / "model.ckpt", 64, image_threshold=1.0,
                                                          pixel_threshold=0.8))},
        "store": {"path": str(settings.store.path), "max_gb": 0.05},
        "plc": {"driver": "modbus", "host": "127.0.0.1", "port": plc.port, "stop_address": 0, "heartbeat_address": 1},
        "api": {"port": free_port()},
    }
    path = tmp_path / "knitwatch.toml"
    path.write_text(to_toml(cfg))
    return path, cfg, ids


def test_parse_time() -> None:
    import datetime as dt

    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    ns = int(now.timestamp() * 1e9)
    assert parse_time("90s", now) == ns - 90 * 10**9
    assert parse_time("2h", now) == ns - 7200 * 10**9
    assert parse_time("1.5d", now) == ns - 129600 * 10**9
    assert parse_time("1w", now) == ns - 7 * 86400 * 10**9
    assert parse_time("now", now) == ns
    assert parse_time("today", now) == int(dt.datetime(2024, 5, 1, tzinfo=dt.UTC).timestamp() * 1e9)
    assert parse_time("2024-05-01T10:00:00Z") == ns - 7200 * 10**9
    assert parse_time("2024-05-01T14:00:00+02:00") == ns
    assert parse_time("1714564800") == ns
    for bad in ("", "yesterday-ish", "5 parsecs", "2024-13-01"):
        with pytest.raises(ValueError):
            parse_time(bad, now)


def test_defects_list_and_show(setup, capsys: pytest.CaptureFixture) -> None:
    cfg_path, cfg, ids = setup
    rc, out, _ = run(capsys, "defects", "list", "--config", str(cfg_path))
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "TIME", "CAMERA", "SEVERITY"]
    assert [int(ln.split()[0]) for ln in lines[1:-1]] == ids[::-1]
    assert lines[-1] == f"{len(EVENTS)} of {len(EVENTS)} event(s)"
    assert "LATCHED" in out
    rc, out, _ = run(capsys, "defects", "list", "--config", str(cfg_path), "--camera", "cam1", "--json")
    body = json.loads(out)
    assert rc == 0 and [e["id"] for e in body["items"]] == [ids[5], ids[3], ids[2]]
    rc, out, _ = run(capsys, "defects", "list", "--config", str(cfg_path), "--since", "100m", "--action", "stop")
    assert [int(ln.split()[0]) for ln in out.strip().splitlines()[1:-1]] == [ids[6], ids[4]]
    rc, out, _ = run(capsys, "defects", "list", "--config", str(cfg_path), "--limit", "2")
    assert out.strip().endswith("2 of 7 event(s) (--offset 2 for more)")
    rc, out, err = run(capsys, "defects", "list", "--config", str(cfg_path), "--since", "last week")
    assert rc == 2 and "cannot read 'last week' as a time" in err

    rc, out, _ = run(capsys, "defects", "show", "--config", str(cfg_path), str(ids[0]))
    assert rc == 0
    assert f"event {ids[0]}" in out and "camera      cam0" in out and "major -> action stop" in out
    store_root = Path(cfg["store"]["path"]).resolve()
    frame_line = next(ln for ln in out.splitlines() if ln.strip().startswith("frame "))
    assert Path(frame_line.split(None, 1)[1]).is_relative_to(store_root)
    rc, out, _ = run(capsys, "defects", "show", "--config", str(cfg_path), str(ids[0]), "--json")
    e = json.loads(out)
    assert e["id"] == ids[0] and Path(e["paths"]["overlay"]).is_file()
    assert run(capsys, "defects", "show", "--config", str(cfg_path), "../1")[0] == 2
    rc, _, err = run(capsys, "defects", "show", "--config", str(cfg_path), "99999")
    assert rc == 1 and "no event 99999" in err


def test_defects_export_folder_and_zip(setup, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cfg_path, _, ids = setup
    out_dir = tmp_path / "export"
    rc, out, _ = run(capsys, "defects", "export", "--config", str(cfg_path), "--since", "100m", "--out", str(out_dir))
    assert rc == 0 and "exported 4 event(s), 12 picture(s)" in out
    with open(out_dir / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == [ids[6], ids[5], ids[4], ids[3]]
    for r in rows:
        for kind in ("frame", "overlay", "mask"):
            assert (out_dir / r[kind]).is_file()
        assert (out_dir / "events" / f"{int(r['id']):08d}" / "event.json").is_file()
    meta = json.loads((out_dir / "index.json").read_text())
    assert meta["count"] == 4 and meta["filters"] == {"since": "100m"} and meta["kinds"] == ["frame", "overlay", "mask"]
    # a non-empty folder is not overwritten by accident
    rc, _, err = run(capsys, "defects", "export", "--config", str(cfg_path), "--out", str(out_dir))
    assert rc == 2 and "--force" in err
    # zip, only false positives (feedback for retraining), thumbnails included
    store = Store.from_config(StoreConfig(path=Path(setup[1]["store"]["path"])), create=False)
    store.mark_false_positive(ids[2], by="maria", note="cutline")
    store.close()
    z = tmp_path / "fp.zip"
    rc, out, _ = run(capsys, "defects", "export", "--config", str(cfg_path), "--false-positive", "--kinds",
                     "frame,thumb", "--out", str(z))
    assert rc == 0
    with zipfile.ZipFile(z) as zf:
        names = set(zf.namelist())
        assert names == {"index.csv", "index.json", f"events/{ids[2]:08d}/frame.png", f"events/{ids[2]:08d}/thumb.jpg",
                         f"events/{ids[2]:08d}/event.json"}
        frame = cv2.imdecode(np.frombuffer(zf.read(f"events/{ids[2]:08d}/frame.png"), np.uint8), cv2.IMREAD_UNCHANGED)
        assert frame.shape[:2] == (256, 512)
        assert json.loads(zf.read("index.json"))["events"][0]["fp_by"] == "maria"
    assert run(capsys, "defects", "export", "--config", str(cfg_path), "--out", str(z))[0] == 2  # exists
    assert run(capsys, "defects", "export", "--config", str(cfg_path), "--kinds", "frame,secret", "--out",
               str(tmp_path / "x"))[0] == 2


def test_status_talks_to_the_api(setup, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cfg_path, cfg, ids = setup
    settings = make_settings(tmp_path)  # the same store
    view = StaticView(SNAPSHOT, healthy=True)
    server = ApiServer(create_app(settings, view), "127.0.0.1", cfg["api"]["port"]).start()
    try:
        rc, out, _ = run(capsys, "status", "--config", str(cfg_path))
        assert rc == 0, out
        assert out.startswith(f"knitwatch at http://127.0.0.1:{cfg['api']['port']}: healthy, inspecting, up 1h02m")
        assert "ALARM LATCHED: stop cam0, cam1" in out
        cam1 = next(ln for ln in out.splitlines() if ln.startswith("cam1"))
        assert "94.0%" in cam1 and "230/512 ms" in cam1 and "STOP" in cam1 and f"#{ids[5]}" in cam1
        assert "infer.0 (1 restarts)" in out and "PLC: modbus connected" in out
        assert "GPU 0 NVIDIA Test: 37% busy" in out and "CUDA memory allocated by infer.0" in out
        rc, out, _ = run(capsys, "status", "--config", str(cfg_path), "--json")
        assert json.loads(out)["cameras"]["cam0"]["last_event"]["id"] == ids[6]
        view.healthy = False
        assert run(capsys, "status", "--config", str(cfg_path))[0] == 1
    finally:
        server.stop()
    rc, _, err = run(capsys, "status", "--config", str(cfg_path), "--timeout", "2")
    assert rc == 1 and "no knitwatch daemon answers" in err
    server = ApiServer(create_app(settings, view, token=TOKEN), "127.0.0.1", 0).start()
    try:
        rc, _, err = run(capsys, "status", "--config", str(cfg_path), "--url", server.url)
        assert rc == 1 and "wants an API token" in err
        rc, out, _ = run(capsys, "status", "--config", str(cfg_path), "--url", server.url, "--token", TOKEN)
        assert rc == 1 and "NOT HEALTHY" in out  # answered (unhealthy view): exit 1
    finally:
        server.stop()


def test_doctor(setup, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    cfg_path, cfg, _ = setup
    rc, out, _ = run(capsys, "doctor", "--config", str(cfg_path))
    rows = {ln.split()[0] + (" " + ln.split()[1] if ln.startswith("camera") else ""): ln
            for ln in out.splitlines()[1:] if ln and not ln.startswith((" ", "to fix"))}
    assert rc == 0, out
    assert " OK " in rows["config"] and " OK " in rows["model"] and "efficientad-s" in rows["model"]
    assert " OK " in rows["camera cam0"] and "frame 256x128" in rows["camera cam0"]
    assert " OK " in rows["camera cam1"] and "frame 96x64" in rows["camera cam1"]
    assert " OK " in rows["PLC"] and "stop output off" in rows["PLC"]
    assert " OK " in rows["store"] and "7 event(s)" in rows["store"]
    assert rows["GPU"].split()[1] in ("OK", "WARN")  # WARN: no GPU here, inference on the CPU
    assert " OK " in rows["API"]
    # now break things: the PLC is gone, a camera folder is missing, the model is corrupt
    broken = dict(cfg)
    broken["plc"] = {**cfg["plc"], "port": free_port(), "timeout_s": 0.5}
    broken["cameras"] = [cfg["cameras"][0], {"id": "cam1", "source": "folder", "uri": str(tmp_path / "nope")}]
    bad_model = tmp_path / "bad.ckpt"
    bad_model.write_bytes(b"not a checkpoint")
    broken["model"] = {"checkpoint": str(bad_model)}
    bad_cfg = tmp_path / "broken.toml"
    bad_cfg.write_text(to_toml(broken))
    rc, out, _ = run(capsys, "doctor", "--config", str(bad_cfg), "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert rc == 1
    assert checks["PLC"]["status"] == "FAIL" and "cannot connect" in checks["PLC"]["detail"] and checks["PLC"]["fix"]
    assert checks["camera cam1"]["status"] == "FAIL" and "does not exist" in checks["camera cam1"]["detail"]
    assert checks["model"]["status"] == "FAIL" and "not a readable checkpoint" in checks["model"]["detail"]
    assert checks["camera cam0"]["status"] == "OK" and checks["store"]["status"] == "OK"
    rc, out, _ = run(capsys, "doctor", "--config", str(bad_cfg))
    assert rc == 1 and "to fix:" in out and "  PLC: check the PLC's address/port" in out
    # an invalid config is one failed check
    (tmp_path / "invalid.toml").write_text("[alert]\nmin_area = 5\n")
    rc, out, _ = run(capsys, "doctor", "--config", str(tmp_path / "invalid.toml"))
    assert rc == 1 and "config" in out and "FAIL" in out


def test_defects_list_leaves_a_folder_without_an_index_alone(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("KNITWATCH_STORE__PATH", str(store))
    code, _, err = run(capsys, "defects", "list")
    assert code != 0
    assert "no event index" in err and str(store) in err
    assert list(store.iterdir()) == []  # no empty index created by a reader
