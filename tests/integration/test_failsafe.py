"""Fault injection: a latched stop never lets go without an acknowledge, whatever happens to the store.

The alert stage runs as a real process fed real result messages over ZeroMQ; the PLC is the real
pymodbus server of :class:`SimulatedPlc`; the store is real SQLite files on a real file system - a
tmpfs that the test fills up or remounts read-only where it may mount one (root with CAP_SYS_ADMIN;
otherwise those tests are skipped with the reason); acknowledges go through the real ``knitwatch
ack`` command. Each case asserts the safe outcome: the PLC's stop output stays 1 until acknowledged,
inspection and stops go on, the acknowledge works without the index, health says why it is degraded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from knitwatch.config.settings import CameraConfig, PlcConfig, StoreConfig
from knitwatch.pipeline.actions import ActionRunner, Job, LogDriver
from knitwatch.pipeline.actions.latch import (
    LATCH_FILE,
    MAILBOX_FILE,
    LatchFile,
    LatchFileError,
    post_ack_request,
    read_view,
    take_ack_requests,
)
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.store.database import FILE_KINDS, Store
from tests.helpers.alert import AlertUnderTest, knitwatch_ack, plc_cfg
from tests.helpers.net import sample, wait_for

H, W = 120, 160


def alert(run_dir: Path, store: StoreConfig, plc: PlcConfig) -> AlertUnderTest:
    return AlertUnderTest(run_dir, store, plc, shape=(H, W), defect_at=(40, 50))


def stays_on(plc: SimulatedPlc, seconds: float = 1.0) -> bool:
    return all(sample(lambda: plc.coil(0), seconds, interval=0.05))


def stays_off(plc: SimulatedPlc, seconds: float = 1.0) -> bool:
    return not any(sample(lambda: plc.coil(0), seconds, interval=0.05))


def write_config(path: Path, store: StoreConfig) -> Path:
    latch_dir = getattr(store, "latch_dir", None)
    latch = f'latch_dir = "{latch_dir}"\n' if latch_dir is not None else ""
    path.write_text(f'[[cameras]]\nid = "c"\n[store]\npath = "{store.path}"\nfsync = false\n{latch}')
    return path


def latch_a_stop(a: AlertUnderTest, plc: SimulatedPlc, epoch: int = 1) -> dict[str, Any]:
    a.actions(lambda s: s.get("plc_connected"))
    a.defect(epoch)
    wait_for(lambda: plc.coil(0), timeout=10, what="the stop on the PLC")
    return a.actions(lambda s: s["latched"] and s["pending"] == 0)


def degraded(actions: dict[str, Any], word: str) -> bool:
    return any(word in reason for reason in actions.get("degraded", []))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (skips the test where it cannot be mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "knitwatch-test", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def stop_and_die(run_dir: Path, store: StoreConfig, plc: SimulatedPlc) -> None:
    """An alert stage latches a stop on the PLC, then is killed where it stands."""
    a = alert(run_dir, store, plc_cfg(plc.port))
    try:
        latch_a_stop(a, plc)
    finally:
        a.kill()


def remount(path: Path, mode: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte (a file that grows until ENOSPC)."""
    big = folder / "filler"
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
    finally:
        os.close(fd)
    return big


# ---------------------------------------------------------------------- the store broken at start


def test_corrupt_index_at_start_keeps_the_stop_and_ack_works_without_it(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    store = StoreConfig(path=tmp_path / "store", fsync=False)
    cfg = write_config(tmp_path / "k.toml", store)
    stop_and_die(tmp_path / "run1", store, plc)
    index = tmp_path / "store" / "events.sqlite3"
    index.write_bytes(b"this is not an SQLite database\n" * 200)  # corrupt, as a torn disk write leaves it
    for side in ("-wal", "-shm"):
        Path(f"{index}{side}").unlink(missing_ok=True)

    b = alert(tmp_path / "run2", store, plc_cfg(plc.port))
    try:
        s = b.actions(lambda s: s.get("plc_connected"))
        assert stays_on(plc), "the stop was released without an acknowledge"
        s = b.actions(lambda s: s["latched_cameras"]["stop"] == ["c"])
        assert degraded(s, "store") and "not a database" in s["store"]["problem"]
        # inspection and stops go on: a new stop event gets an id and is held in memory
        b.defect(epoch=2)
        s = b.actions(lambda s: s["store"]["held_events"] == 1 and s["pending"] == 0)
        held = [i for i in s["latched_events"]["stop"]["c"] if i < 0]
        assert len(held) == 1 and plc.coil(0)
        # the acknowledge, without the index
        r = knitwatch_ack(cfg, "--by", "anna", "--note", "index broken", "--wait", "20")
        assert r.returncode == 0, r.stderr
        assert "latch folder" in r.stdout and "outputs reset" in r.stdout
        assert not plc.coil(0)
        b.actions(lambda s: not s["latched"] and s.get("acks") == 1)
        assert stays_off(plc, 0.5)
        # the index comes back (moved aside by the operator): the held event and the acknowledge are written
        index.rename(index.with_name("events.sqlite3.broken"))
        s = b.actions(lambda s: s["store"]["ok"] and s["store"]["held_events"] == 0
                      and s["store"]["acks_not_in_store"] == 0 and not s["degraded"], timeout=20)
        fresh = Store.from_config(store, create=False)
        wait_for(lambda: fresh.list_events()["total"] == 1 and all(fresh.list_events()["items"][0]["files"].values()),
                 timeout=10, what="the held event's pictures")
        (ev,) = fresh.list_events()["items"]
        rec = fresh.get_event(ev["id"])["record"]
        assert ev["id"] > 0 and ev["acknowledged"] and ev["action_state"] == "confirmed"
        assert rec["held_in_memory"]["local_id"] == held[0] and rec["actions"][0]["confirmed"]
        (ack,) = fresh.list_acks()
        assert ack["by"] == "anna" and ack["note"] == "index broken" and ack["events_acked"] == 1 and ack["cleared"]
        fresh.close()
    finally:
        assert b.stage.stop() == 0
    c = alert(tmp_path / "run3", store, plc_cfg(plc.port))  # nothing latched: a restart keeps it off
    try:
        c.actions(lambda s: s.get("plc_connected") and s["pending"] == 0)
        assert stays_off(plc, 0.5) and not c.actions(lambda s: True)["latched"]
    finally:
        assert c.stage.stop() == 0
        plc.stop()


def test_read_only_store_at_start_keeps_the_stop(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    with tmpfs(tmp_path / "disk", "32m") as disk:
        store = StoreConfig(path=disk / "store", fsync=False)
        cfg = write_config(tmp_path / "k.toml", store)
        stop_and_die(tmp_path / "run1", store, plc)
        remount(disk, "ro")
        b = alert(tmp_path / "run2", store, plc_cfg(plc.port))
        try:
            b.actions(lambda s: s.get("plc_connected"))
            assert stays_on(plc), "the stop was released without an acknowledge"
            s = b.actions(lambda s: s["latched_cameras"]["stop"] == ["c"] and degraded(s, "store"))
            assert "readonly" in s["store"]["problem"] or "read-only" in s["store"]["problem"]
            r = knitwatch_ack(cfg, "--by", "anna", "--wait", "2")  # nothing on that disk can take it
            assert r.returncode == 1 and "Read-only file system" in r.stderr and "latch folder" in r.stderr
            assert plc.coil(0)
            remount(disk, "rw")
            r = knitwatch_ack(cfg, "--by", "anna", "--wait", "20")
            assert r.returncode == 0, r.stderr
            assert not plc.coil(0)
            b.actions(lambda s: not s["latched"] and s["store"]["ok"] and not s["degraded"], timeout=20)
        finally:
            assert b.stage.stop() == 0
            plc.stop()


def test_full_disk_keeps_the_stop_and_takes_the_acknowledge(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    with tmpfs(tmp_path / "disk", "8m") as disk:
        store = StoreConfig(path=disk / "store", fsync=False)
        cfg = write_config(tmp_path / "k.toml", store)
        a = alert(tmp_path / "run1", store, plc_cfg(plc.port))
        b = None
        try:
            a.actions(lambda s: s.get("plc_connected"))
            filler = fill(disk)
            s = latch_a_stop(a, plc)  # the event cannot be stored: it gets an id all the same, the stop lands
            (eid,) = s["latched_events"]["stop"]["c"]
            assert eid < 0 and s["store"]["held_events"] == 1
            s = a.actions(lambda s: degraded(s, "store"))
            assert "full" in s["store"]["problem"]
            assert read_view(store.path)["stop"] == ["c"]  # the latch file holds it (written in place)
            assert s.get("latch_file_in_place", 0) >= 1 and not s["latch_file"]["problem"]
            r = knitwatch_ack(cfg, "--by", "anna", "--wait", "20")
            assert r.returncode == 0, r.stderr
            assert not plc.coil(0)
            latch_a_stop(a, plc, epoch=2)  # a new stop, still on the full disk, then a restart
            a.kill()
            b = alert(tmp_path / "run2", store, plc_cfg(plc.port))
            b.actions(lambda s: s.get("plc_connected"))
            assert stays_on(plc), "a restart on a full disk released the stop"
            filler.unlink()  # room again
            b.actions(lambda s: s["store"]["ok"] and not s["degraded"], timeout=20)
            r = knitwatch_ack(cfg, "--by", "anna", "--wait", "20")
            assert r.returncode == 0, r.stderr
            assert not plc.coil(0)
        finally:
            if b is not None:
                assert b.stage.stop() == 0
            if a.stage.proc.is_alive():
                a.stage.stop()
            plc.stop()


def test_store_folder_removed_while_running(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    store = StoreConfig(path=tmp_path / "store", fsync=False)
    cfg = write_config(tmp_path / "k.toml", store)
    a = alert(tmp_path / "run1", store, plc_cfg(plc.port))
    try:
        latch_a_stop(a, plc)
        shutil.rmtree(store.path)
        wait_for(lambda: (store.path / LATCH_FILE).is_file(), timeout=5, what="the latch file written again")
        s = a.actions(lambda s: s.get("latch_file_lost", 0) >= 1)
        assert s["latched_cameras"]["stop"] == ["c"] and plc.coil(0)
        a.defect(epoch=2)  # the next event goes to a new index (not into the removed file)
        s = a.actions(lambda s: len(s["latched_events"]["stop"]["c"]) == 2 and s["pending"] == 0)
        new_id = max(s["latched_events"]["stop"]["c"])
        assert new_id > 0
        view = Store.from_config(store, create=False)
        wait_for(lambda: (view.get_event(new_id) or {}).get("state") == "complete", timeout=10)
        view.close()
    finally:
        a.kill()
    b = alert(tmp_path / "run2", store, plc_cfg(plc.port))  # the next start: pictures kept, stop kept
    try:
        b.actions(lambda s: s.get("plc_connected"))
        assert stays_on(plc)
        view = Store.from_config(store, create=False)
        assert all(view.get_event(new_id)["files"].values())
        r = knitwatch_ack(cfg, "--by", "anna", "--wait", "20")
        assert r.returncode == 0, r.stderr
        assert not plc.coil(0)
        b.actions(lambda s: not s["latched"])
        for kind in FILE_KINDS:
            assert view.file_path(new_id, kind) is not None
        view.close()
    finally:
        assert b.stage.stop() == 0
        plc.stop()


# ---------------------------------------------------------------------- the latch file on a full disk


def test_latch_file_and_mailbox_work_on_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        latch = LatchFile(disk / "latch")
        assert latch.write({"latch": {"stop": {"c": {"7": 1}}, "alarm": {}}, "latch_seq": 1}) == "atomic"
        assert take_ack_requests(disk / "latch") == []  # creates the (empty, full-size) mailbox
        fill(disk)
        with pytest.raises(OSError):
            (disk / "latch" / "new-file").write_bytes(b"x" * 8192)
        assert latch.write({"latch": {"stop": {}, "alarm": {}}, "latch_seq": 2}) == "in place"
        assert latch.read()["latch_seq"] == 2
        req = post_ack_request(disk / "latch", by="anna", camera=None, note="full disk", covers_seq=2)
        (got,) = take_ack_requests(disk / "latch")
        assert got["token"] == req["token"] and got["by"] == "anna" and got["covers_seq"] == 2
        assert take_ack_requests(disk / "latch") == []


def test_a_torn_latch_file_reads_as_latched(tmp_path: Path) -> None:
    latch = LatchFile(tmp_path)
    latch.write({"latch": {"stop": {}, "alarm": {}}, "latch_seq": 5})
    data = bytearray((tmp_path / LATCH_FILE).read_bytes())
    data[40:48] = b"XXXXXXXX"  # a torn write: the check sum no longer matches (or it does not parse)
    (tmp_path / LATCH_FILE).write_bytes(bytes(data))
    with pytest.raises(LatchFileError, match="corrupt"):
        latch.read()
    view = read_view(tmp_path)
    assert not view["ok"] and view["stop"] == ["*"]
    (tmp_path / MAILBOX_FILE).write_bytes(b"{" * 100)
    with pytest.raises(LatchFileError):
        take_ack_requests(tmp_path)
    assert take_ack_requests(tmp_path) == []  # emptied after the report


# ---------------------------------------------------------------------- health and the API without the index


def test_health_api_and_page_show_the_latch_and_take_the_ack_without_the_index(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from knitwatch.config import Settings
    from knitwatch.daemon.api.app import create_app
    from knitwatch.daemon.api.deps import StaticView
    from knitwatch.daemon.supervisor import Supervisor

    root = tmp_path / "store"
    root.mkdir()
    (root / "events.sqlite3").write_bytes(b"not an SQLite database\n" * 300)
    settings = Settings(cameras=[CameraConfig(id="c")], store=StoreConfig(path=root, fsync=False))
    store = Store.from_config(settings.store, degraded_ok=True)
    runner = ActionRunner(LogDriver(), store=store, latch_dir=root, ack_poll_s=0.05).start()
    try:
        eid = runner.local_event_id()
        runner.hold_event({"event_id": eid, "camera": "c"}, {"camera": "c", "t_wall_ns": time.time_ns(), "seq": 3,
                                                             "severity": "major", "action": "stop", "image_score": 2.0,
                                                             "max_area_px": 600})
        runner.submit(Job("event", "stop", "c", event_id=eid))
        wait_for(lambda: read_view(root)["stop"] == ["c"] and bool(runner.stats()["degraded"]))
        # the supervisor's health carries the action runner's reasons (as the alert stage's heartbeat brings them)
        sup = Supervisor(settings, checkpoint={"path": "m.ckpt", "thresholds": {"image": 1.0}, "preprocess": {}},
                         run_dir=tmp_path / "run")
        sup.procs["alert"].stats = {"actions": runner.stats()}
        sup._update_health()
        reasons = sup.health()["degraded"]
        assert reasons == runner.stats()["degraded"] and any("not a database" in r for r in reasons)
        snapshot = {"ready": True, "stages": {"alert": {"actions": runner.stats()}}}
        http = TestClient(create_app(settings, StaticView(snapshot, healthy=True, degraded=reasons)),
                          base_url="http://127.0.0.1:8080")
        r = http.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["degraded"] == reasons
        assert str(root) not in r.text
        alarm = http.get("/api/alarm").json()
        assert alarm["stop"] == ["c"] and alarm["latched"] and alarm["source"] == "latch file"
        assert alarm["events"] == [{"id": eid, "camera": "c", "action": "stop"}]
        st = http.get("/api/stats").json()
        assert st["alarm"]["stop"] == ["c"] and st["cameras"]["c"]["latched"]["stop"] and st["degraded"] == reasons
        text = http.get("/metrics").text
        assert 'knitwatch_alarm_latched{action="stop",camera="c"} 1.0' in text
        assert 'knitwatch_degraded{part="store"} 1.0' in text and "knitwatch_healthy 0.0" in text
        r = http.post("/api/alarm/ack?wait=10", json={"by": "anna", "note": "from the page"})
        body = r.json()
        assert r.status_code == 200 and body["ack_id"] is None and body["ack_token"] and body["cleared"]
        assert body["latched_before"] == {"stop": ["c"], "alarm": []}
        assert body["latched"] == {"stop": [], "alarm": []} and not runner.stats()["latched"]
    finally:
        runner.stop()
        store.close()
