"""Rolls end to end on real parts: the ``knitwatch roll`` command (a subprocess), the API (the real
FastAPI app with its security gate), and the alert stage (a real process) reading the doff signal from
the simulated PLC (a real pymodbus server) and taking a ``knitwatch roll new`` while it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, CameraConfig, StoreConfig
from knitwatch.daemon.api.app import create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.cli.main import main
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.store.database import Store
from tests.helpers.alert import AlertUnderTest, plc_cfg
from tests.helpers.api import TOKEN
from tests.helpers.cli import knitwatch
from tests.helpers.rolls import ROLL_CFG, ROLL_TOML, fill


@pytest.fixture
def rolled(tmp_path: Path) -> tuple[Path, Path, int, list[int]]:
    root = tmp_path / "store"
    rid, ids = fill(root)
    cfg = tmp_path / "knitwatch.toml"
    cfg.write_text(ROLL_TOML.format(store=root))
    return cfg, root, rid, ids


def test_cli_report_json_csv_html(rolled: tuple[Path, Path, int, list[int]], tmp_path: Path) -> None:
    cfg, root, rid, ids = rolled
    r = knitwatch("--config", str(cfg), "roll", "report", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["roll"]["id"] == rid and rep["roll"]["machine"] == "M1" and rep["roll"]["note"] == "article 42"
    assert rep["length_m"] == 50.0 and rep["area_m2"] == 90.0
    assert rep["points"]["total"] == 1 + 4 and rep["points"]["before_yard_cap"] == 7
    assert rep["points"]["per_100_m2"] == round(5 * 100 / 90, 2) and rep["points"]["grade"] == "A"
    assert [d["points"] for d in rep["defects"]] == [1, 2, 4]
    day = rep["defects"][0]["time"][:10]  # the event folders are by UTC date
    assert rep["defects"][0]["pictures"]["overlay"] == f"events/{day}/{ids[0]:08d}/overlay.jpg"
    assert (root / rep["defects"][0]["pictures"]["overlay"]).is_file()

    r = knitwatch("--config", str(cfg), "roll", "report", str(rid), "--csv", "--length-m", "10", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("# length_m 10.0 area_m2 18.0 points 5 per_100_m2 27.78")  # 5 x 100 / 18: grade B
    assert "grade B" in lines[1]
    assert [ln.split(",")[0] for ln in lines[3:]] == [str(i) for i in ids]

    out = tmp_path / "out" / "roll.html"
    out.parent.mkdir()
    r = knitwatch("--config", str(cfg), "roll", "report", "current", "--html", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert '<span class="grade" id="grade">A</span>' in page
    thumb = f"../store/events/{rep['defects'][2]['time'][:10]}/{ids[2]:08d}/thumb.jpg"
    assert f'src="{thumb}"' in page and (out.parent / thumb).is_file()

    r = knitwatch("--config", str(cfg), "roll", "report", timeout=120)  # text
    assert r.returncode == 0, r.stderr
    assert "points 5 (7 before the 4-per-yard cap), per 100 m2 5.56, per 100 yd2 4.65, grade A" in r.stdout


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``knitwatch ARGV`` in this process (argparse's own errors exit 2 too): exit code and stderr."""
    try:
        rc = main(["--log-level", "WARNING", *argv])
    except SystemExit as e:
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def test_cli_bad_input_exits_2_and_writes_nothing(rolled: tuple[Path, Path, int, list[int]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    cfg, _root, rid, _ids = rolled
    cases = [(["roll", "report", "99"], "no roll 99"),
             (["roll", "report", "abc"], "roll id must be a positive integer"),
             (["roll", "report", "--csv", "--html"], "not allowed with"),
             (["roll", "report", "--length-m", "-3"], "--length-m"),
             (["roll", "report", "--out", str(tmp_path / "x.txt")], "--out needs a format"),
             (["roll", "report", "--json", "--out", str(tmp_path / "missing" / "r.json")], "does not exist"),
             (["roll", "new", "--wait", "-1"], "--wait")]
    for args, msg in cases:
        rc, err = _cli(capsys, "--config", str(cfg), *args)
        assert rc == 2, (args, rc, err)
        assert msg in err, (args, err)
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "missing").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(ROLL_TOML.format(store=tmp_path / "store").replace("fabric_width_m = 1.8", "fabric_width_m = -1"))
    rc, err = _cli(capsys, "--config", str(bad), "roll", "list")
    assert rc == 2 and "fabric_width_m" in err
    store = Store(tmp_path / "store", retention_days=3650, max_gb=1, fsync=False)
    assert store.list_rolls()["total"] == 1 and store.current_roll()["id"] == rid  # nothing started
    store.close()


def test_cli_new_and_list_without_a_daemon(rolled: tuple[Path, Path, int, list[int]]) -> None:
    cfg, root, rid, _ids = rolled
    r = knitwatch("--config", str(cfg), "roll", "new", "--note", "article 43", "--by", "ben", "--wait", "0.3",
                  timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"roll {rid + 1} started by ben (article 43)" in r.stdout
    assert "did not take" in r.stderr  # no daemon: said, and the roll is open all the same
    r = knitwatch("--config", str(cfg), "roll", "list", "--json", timeout=120)
    items = json.loads(r.stdout)["items"]
    assert [(x["id"], x["open"], x["reason"], x["by"]) for x in items] == [(rid + 1, True, "command", "ben"),
                                                                         (rid, False, "command", "anna")]
    assert items[0]["machine"] == "M1" and items[1]["events"] == 3 and items[0]["events"] == 0


def _client(root: Path, token: str | None = None) -> TestClient:
    settings = Settings(cameras=[CameraConfig(id="c")], store=StoreConfig(path=root, fsync=False),
                        api=ApiConfig(), roll=ROLL_CFG)
    return TestClient(create_app(settings, StaticView({}, healthy=True), token=token),
                      base_url="http://127.0.0.1:8080")


def test_api_rolls_routes(rolled: tuple[Path, Path, int, list[int]]) -> None:
    _cfg, root, rid, ids = rolled
    c = _client(root)
    body = c.get("/api/rolls").json()
    assert [r["id"] for r in body["items"]] == [rid] and body["items"][0]["report_url"] == f"/api/rolls/{rid}/report"
    rep = c.get("/api/rolls/current/report").json()
    assert rep["points"]["total"] == 5 and rep["points"]["grade"] == "A" and rep["counts"]["defects"] == 3
    assert rep["defects"][0]["urls"]["thumb"] == f"/api/events/{ids[0]}/thumb"
    assert c.get(rep["defects"][0]["urls"]["thumb"]).status_code == 200
    assert c.get(f"/api/rolls/{rid}/report", params={"length_m": 10}).json()["points"]["grade"] == "B"
    csv_text = c.get(f"/api/rolls/{rid}/report", params={"format": "csv"})
    assert csv_text.status_code == 200 and csv_text.headers["content-type"].startswith("text/csv")
    assert c.get("/api/rolls/999/report").status_code == 404
    assert c.get("/api/rolls/x1/report").status_code == 400
    assert c.get(f"/api/rolls/{rid}/report", params={"format": "pdf"}).status_code == 422
    r = c.post("/api/rolls", json={"by": "maria", "note": "article 44"})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["roll_id"] == rid + 1 and new["taken"] is False and new["roll"]["reason"] == "api"
    assert new["roll"]["by"] == "maria" and new["roll"]["machine"] == "M1" and new["roll"]["cameras"] == ["c"]
    assert c.get("/api/rolls/current/report").json()["counts"]["defects"] == 0
    # a cross-site page may not start a roll (the acknowledge's rules)
    for headers in ({"Origin": "null"}, {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        assert c.post("/api/rolls", json={}, headers=headers).status_code == 403, headers
    assert c.get("/api/rolls").json()["total"] == 2


def test_api_rolls_need_the_token(rolled: tuple[Path, Path, int, list[int]]) -> None:
    _cfg, root, rid, _ids = rolled
    c = _client(root, token=TOKEN)
    for method, path in (("GET", "/api/rolls"), ("GET", f"/api/rolls/{rid}/report"), ("POST", "/api/rolls")):
        assert c.request(method, path).status_code == 401, path
        assert c.request(method, path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/rolls", headers=auth).status_code == 200
    assert c.post("/api/rolls", json={"note": "n"}, headers=auth).json()["roll_id"] == rid + 1


def _pos(rev: int, offset: float) -> dict[str, Any]:
    return {"ok": True, "rev": rev, "offset_px": offset, "circumference_px": 1000.0, "source": "plc"}


def test_doff_edge_and_roll_new_reach_the_running_alert_stage(tmp_path: Path, plc: SimulatedPlc) -> None:
    """The alert stage reads the doff coil of a real Modbus server: its rising edge starts a roll, with
    the fabric position of that moment; ``knitwatch roll new`` is taken the same way while it runs."""
    from pymodbus.client import ModbusTcpClient

    root = tmp_path / "store"
    stage = AlertUnderTest(tmp_path / "run", root, plc_cfg(plc.port, doff_address=5, doff_poll_s=0.05))
    machine = ModbusTcpClient(plc.host, port=plc.port, timeout=2.0)
    assert machine.connect()

    def set_doff(on: bool) -> None:
        assert not machine.write_coil(5, on, device_id=1).isError()

    def wait_roll(pred: Any, timeout: float = 20.0) -> dict[str, Any]:  # noqa: ANN401
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = store.current_roll() if (root / "events.sqlite3").exists() else None
            if cur is not None and pred(cur):
                return cur
            time.sleep(0.05)
        raise AssertionError(f"no such roll within {timeout} s: {cur}")

    try:
        for seq in range(3):  # a stop defect at revolution 4: the first event opens the first roll
            stage.send(seq, seq > 0, pos=_pos(4, 200.0))
        stage.stats(lambda s: s.get("cameras", {}).get("c", {}).get("events") == 1)
        store = Store(root, retention_days=3650, max_gb=1, fsync=False)
        first = wait_roll(lambda r: r["handled"] is not None)
        assert first["reason"] == "first event" and first["start_pos"] == {"c": 4.2}
        stage.stats(lambda s: s.get("rolls", {}).get("doff_signal", {}).get("value") == 0)
        for seq in range(3, 6):  # the fabric moves on: revolution 7, a quarter round
            stage.send(seq, False, pos=_pos(7, 250.0))
        stage.stats(lambda s: s.get("cameras", {}).get("c", {}).get("inspected") == 6)
        set_doff(True)  # the doff: a new roll at 7.25 revolutions
        doff = wait_roll(lambda r: r["reason"] == "doff" and r["handled"] is not None)
        assert doff["start_pos"] == {"c": 7.25} and doff["by"] == "plc" and doff["cameras"] == ["c"]
        assert store.get_roll(first["id"])["end_pos"] == {"c": 7.25} and not store.get_roll(first["id"])["open"]
        time.sleep(0.3)  # the signal stays on: no second roll
        assert store.current_roll()["id"] == doff["id"]
        set_doff(False)
        for seq in range(6, 9):  # the next defect belongs to the new roll
            stage.send(seq, seq > 6, at=(300, 200), pos=_pos(9, 500.0))
        stage.stats(lambda s: s.get("cameras", {}).get("c", {}).get("events") == 2)
        events = store.roll_events(doff["id"])
        assert len(events) == 1 and events[0]["record"]["roll_id"] == doff["id"]
        # the command while the daemon runs: taken by it, with the position it last saw
        cfg = tmp_path / "k.toml"
        cfg.write_text(ROLL_TOML.format(store=root))
        r = knitwatch("--config", str(cfg), "roll", "new", "--note", "shift B", "--wait", "20", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "taken by the daemon" in r.stdout and "c revolution 9.50" in r.stdout, r.stdout
        cmd = store.current_roll()
        assert cmd["reason"] == "command" and cmd["start_pos"] == {"c": 9.5} and cmd["note"] == "shift B"
        assert store.get_roll(doff["id"])["end_pos"] == {"c": 9.5}
        rep = knitwatch("--config", str(cfg), "roll", "report", str(doff["id"]), "--json", timeout=120)
        d = json.loads(rep.stdout)
        assert d["length_m"] == pytest.approx((9.5 - 7.25) * 0.1)
        assert d["defects"][0]["revolution"] == 9 and d["defects"][0]["metres_from_start"] is not None
        store.close()
    finally:
        machine.close()
        stage.stage.stop()


def test_doff_signal_in_a_register_through_a_plc_outage(tmp_path: Path) -> None:
    """The roll keeper's rounds (no thread) against a real pymodbus server that is not there at first,
    then comes, goes and comes back: a doff is a 0 -> non-zero change, also across an outage."""
    from pymodbus.client import ModbusTcpClient

    from knitwatch.config.settings import PlcConfig
    from knitwatch.pipeline.actions.rolls import RollKeeper
    from knitwatch.pipeline.actions.simplc import free_port
    from knitwatch.pipeline.decision.tracking import FramePosition

    port = free_port()
    store = Store(tmp_path / "store", retention_days=3650, max_gb=1, fsync=False)
    keeper = RollKeeper(store, PlcConfig(port=port, doff_address=3, doff_table="holding_register", timeout_s=0.5),
                        ["c"])
    keeper.saw("c", FramePosition(5, 250.0, 1000.0))
    keeper.step(0.0)  # no PLC yet: said, nothing started
    doff = keeper.stats()["doff_signal"]
    assert doff["ok"] is False and "3" in doff["where"] and keeper.counters["doff_read_errors"] == 1
    assert store.current_roll() is None
    plc = SimulatedPlc(port=port).start()
    machine = ModbusTcpClient(plc.host, port=port, timeout=2.0)
    try:
        keeper.step(1.0)
        assert keeper.stats()["doff_signal"]["ok"] and keeper.doff_value == 0 and store.current_roll() is None
        assert machine.connect() and not machine.write_register(3, 7, device_id=1).isError()
        keeper.step(2.0)
        roll = store.current_roll()
        assert roll is not None and roll["reason"] == "doff" and roll["start_pos"] == {"c": 5.25}
        keeper.step(3.0)  # still on: the same roll
        assert store.list_rolls()["total"] == 1
        plc.stop()
        keeper.step(4.0)
        assert not keeper.stats()["doff_signal"]["ok"]
        plc.restart()  # back with all registers 0; the machine doffs again before the next read
        machine.close()
        assert machine.connect() and not machine.write_register(3, 1, device_id=1).isError()
        keeper.saw("c", FramePosition(9, 0.0, 1000.0))
        keeper.step(5.0)  # the last value read was 7, now 1: no edge
        assert store.list_rolls()["total"] == 1
        assert not machine.write_register(3, 0, device_id=1).isError()
        keeper.step(6.0)
        plc.stop()
        keeper.step(7.0)  # the PLC goes away while the signal is 0 ...
        plc.restart()
        machine.close()
        assert machine.connect() and not machine.write_register(3, 1, device_id=1).isError()
        keeper.step(8.0)  # ... and is on when it is back: a doff
        rolls = store.list_rolls()["items"]
        assert [r["reason"] for r in rolls] == ["doff", "doff"] and rolls[0]["start_pos"] == {"c": 9.0}
        assert rolls[1]["end_pos"] == {"c": 9.0} and keeper.counters["doffs"] == 2
    finally:
        machine.close()
        keeper.stop()
        plc.stop()
        store.close()
