"""The alert stage as a real process, fed real result messages over ZeroMQ, stopping a machine whose
PLC is a real pymodbus TCP server on loopback; events in a real store; acknowledges through the real
``knitwatch ack`` command and the store's Python API."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from knitwatch.config.settings import StoreConfig
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.store.database import FILE_KINDS, Store
from tests.helpers.alert import AlertUnderTest, knitwatch_ack, plc_cfg
from tests.helpers.net import free_port, sample, wait_for

H, W = 480, 640


def test_confirmed_defect_stops_the_machine_and_ack_resets_it(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    store_dir = tmp_path / "store"
    a = AlertUnderTest(tmp_path / "run", store_dir, plc_cfg(plc.port))
    try:
        a.stats(lambda s: s.get("actions", {}).get("plc_connected"))
        a.send(0, False)
        a.send(1, True)  # one defective frame: not confirmed (2 of 3 needed)
        a.stats(lambda s: s.get("inspected") == 2)
        assert not plc.coil(0)
        a.send(2, True)  # the second defective frame of three: confirmed, the stop lands (its latency is benchmarked)
        wait_for(lambda: plc.coil(0), timeout=10, interval=0.0005)
        s = a.stats(lambda s: s["actions"]["latched"] and s["actions"]["pending"] == 0)
        assert s["cameras"]["c"]["events"] == 1 and s["actions"]["failures"] == 0

        store = Store.from_config(StoreConfig(path=store_dir, fsync=False))
        wait_for(lambda: store.list_events()["total"] == 1 and store.list_events()["items"][0]["state"] == "complete"
                 and store.list_events()["items"][0]["action_state"] == "confirmed")
        ev = store.get_event(store.list_events()["items"][0]["id"])
        rec = ev["record"]
        assert ev["severity"] == "major" and ev["action"] == "stop" and ev["seq"] == 2 and ev["camera"] == "c"
        assert rec["regions"][0]["bbox"] == [200, 100, 230, 120] and rec["regions"][0]["area"] == 600
        assert rec["thresholds"]["image"] == 1.0 and rec["thresholds"]["confirm_k"] == 2
        assert rec["model"]["id"] == "ckpt-test-1" and rec["frame_shape"] == [H, W]
        action = rec["actions"][0]
        assert action["confirmed"] and action["driver"] == "modbus" and action["read_back"]
        lat = rec["latency_ms"]
        assert 0 <= lat["capture_to_decision"] <= lat["capture_to_action"]
        for kind in FILE_KINDS:
            assert store.file_path(ev["id"], kind) is not None
        import cv2

        mask = cv2.imread(str(store.file_path(ev["id"], "mask")), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (H, W) and int((mask > 0).sum()) == 600
        frame = cv2.imread(str(store.file_path(ev["id"], "frame")), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(frame, a.frame)

        cfg = tmp_path / "k.toml"
        cfg.write_text(f'[[cameras]]\nid = "c"\n[store]\npath = "{store_dir}"\nfsync = false\n')
        r = knitwatch_ack(cfg, "--by", "anna", "--note", "hole mended", "--wait", "20")
        assert r.returncode == 0, r.stderr
        assert "acknowledge #1 by anna" in r.stdout and "outputs reset" in r.stdout
        assert not plc.coil(0)
        ack = store.get_ack(1)
        assert ack["by"] == "anna" and ack["note"] == "hole mended" and ack["events_acked"] == 1 and ack["cleared"]
        assert store.get_event(ev["id"])["acknowledged"]
        a.stats(lambda s: not s["actions"]["latched"] and s["actions"].get("acks") == 1)
        r = knitwatch_ack(cfg, "--camera", "nope")
        assert r.returncode == 2 and "unknown camera" in r.stderr
    finally:
        assert a.stage.stop() == 0
        plc.stop()


def test_isolated_false_alarms_do_not_stop_and_the_heartbeat_follows_inspection(tmp_path: Path) -> None:
    plc = SimulatedPlc().start()
    a = AlertUnderTest(tmp_path / "run", tmp_path / "store", plc_cfg(plc.port, heartbeat_idle_s=1.0, alarm_address=2))
    try:
        a.stats(lambda s: s.get("actions", {}).get("plc_connected"))
        for seq in range(12):  # every third frame defective: never 2 of the last 3
            a.send(seq, seq % 3 == 0)
            time.sleep(0.02)
        s = a.stats(lambda s: s.get("inspected") == 12)
        assert s["cameras"]["c"]["defect_frames"] == 4 and s["cameras"]["c"]["events"] == 0
        beats = sample(lambda: plc.coil(1), 0.5)
        assert True in beats and False in beats  # inspection runs: the heartbeat toggles
        assert not any(sample(lambda: plc.coil(0), 0.2))
        # no results for longer than heartbeat_idle_s: the heartbeat stops, the PLC can fail safe
        a.stats(lambda s: s["actions"]["heartbeat_paused"], timeout=10)
        assert len(set(sample(lambda: plc.coil(1), 0.4))) == 1
        a.send(12, False)
        a.stats(lambda s: not s["actions"]["heartbeat_paused"], timeout=10)
        beats = sample(lambda: plc.coil(1), 0.4)
        assert True in beats and False in beats
        assert Store.from_config(StoreConfig(path=tmp_path / "store")).list_events()["total"] == 0

        # a defect entering the view: small first (minor: alarm), then large within the cool-down (escalated: stop)
        a.send(13, True, area=(3, 3))
        a.send(14, True, area=(3, 3))
        wait_for(lambda: plc.coil(2), timeout=5)
        assert not plc.coil(0)
        a.send(15, True)
        wait_for(lambda: plc.coil(0), timeout=5)
        s = a.stats(lambda s: s.get("inspected") == 16)
        assert s["cameras"]["c"]["events"] == 1 and s["cameras"]["c"]["escalations"] == 1
        store = Store.from_config(StoreConfig(path=tmp_path / "store"))
        wait_for(lambda: store.list_events()["items"][0]["action_state"] == "confirmed")
        (ev,) = store.list_events()["items"]
        assert (ev["severity"], ev["action"], ev["seq"]) == ("major", "stop", 14)
        rec = store.get_event(ev["id"])["record"]
        assert rec["escalated"]["seq"] == 15 and [x["action"] for x in rec["actions"]] == ["alarm", "stop"]

        # the same, but the alarm is acknowledged before the defect grows: the stop is a new event
        a.send(40, True, area=(3, 3))
        a.send(41, True, area=(3, 3))
        wait_for(lambda: store.list_events()["total"] == 2)
        store.request_ack("anna")
        wait_for(lambda: not plc.coil(0) and not plc.coil(2), timeout=5)
        a.send(42, True)
        wait_for(lambda: plc.coil(0), timeout=5)
        s = a.stats(lambda s: s.get("inspected") == 19)
        assert s["cameras"]["c"]["events"] == 3 and s["cameras"]["c"]["escalations"] == 1
        assert [(e["seq"], e["action"], e["acknowledged"]) for e in store.list_events()["items"]] == [
            (42, "stop", False), (41, "alarm", True), (14, "stop", True)]
    finally:
        assert a.stage.stop() == 0
        plc.stop()


def test_stop_lands_when_the_plc_comes_up_and_survives_a_killed_inspector(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: the PLC is down
    store_dir = tmp_path / "store"
    a = AlertUnderTest(tmp_path / "run1", store_dir, plc_cfg(port))
    plc = None
    try:
        for seq in range(3):
            a.send(seq, True)
        s = a.stats(lambda s: s.get("actions", {}).get("failures", 0) >= 3 and s["actions"]["pending"] >= 1)
        assert s["cameras"]["c"]["events"] == 1 and not s["actions"]["plc_connected"]
        assert "cannot connect" in s["actions"]["last_error"]
        for seq in range(3, 8):  # inspection goes on while the PLC is down
            a.send(seq, False)
        a.stats(lambda s: s.get("inspected") == 8)
        store = Store.from_config(StoreConfig(path=store_dir, fsync=False))
        ev = store.list_events()["items"][0]
        assert ev["action_state"] == "pending"  # the row was committed before the action ran

        plc = SimulatedPlc(port=port).start()
        t0 = time.monotonic()
        wait_for(lambda: plc.coil(0), timeout=5)
        assert time.monotonic() - t0 < 2.0
        a.stats(lambda s: s["actions"]["pending"] == 0 and s["actions"]["plc_connected"])
        wait_for(lambda: store.get_event(ev["id"])["action_state"] == "confirmed")
        assert store.get_event(ev["id"])["record"]["actions"][0]["attempts"] >= 2

        os.kill(a.stage.proc.pid, signal.SIGKILL)  # the inspector dies ...
        a.stage.proc.join(5)
        plc.stop()  # ... and the PLC restarts meanwhile (its coils come back 0)
        plc = SimulatedPlc(port=port).start()
        assert not plc.coil(0)
    finally:
        a.stage.stop()

    b = AlertUnderTest(tmp_path / "run2", store_dir, plc_cfg(port))
    try:
        wait_for(lambda: plc.coil(0), timeout=20)  # the latch lives in the store: the stop is asserted again
        s = b.stats(lambda s: s.get("actions", {}).get("latched_cameras", {}).get("stop") == ["c"])
        ack_id = store.request_ack("api-user", camera="c", note="via the Python API")
        wait_for(lambda: not plc.coil(0), timeout=5)
        wait_for(lambda: (store.get_ack(ack_id) or {}).get("cleared") is not None)
        b.stats(lambda s: not s["actions"]["latched"])
    finally:
        assert b.stage.stop() == 0
        plc.stop()


SPEED_PX, CIRC_PX = 32.0, 2560.0  # the web moves 32 px to the left per frame; the tube is 2560 px round


def pos(seq: int) -> dict:
    """The fabric position of frame ``seq`` (what a position source puts into the result's header)."""
    start = seq * SPEED_PX
    return {"rev": int(start // CIRC_PX), "offset_px": start % CIRC_PX, "circumference_px": CIRC_PX,
            "source": "test", "ok": True}


def x_of(tube_x: int, seq: int) -> int:
    """The frame column of tube column ``tube_x`` in frame ``seq``."""
    return int(tube_x - seq * SPEED_PX)


def test_every_defect_at_its_own_place_is_its_own_event_and_stop(tmp_path: Path) -> None:
    """Two stop-class defects at different places of the fabric, the second within the old per-camera
    cool-down (10 frames) of the first and after an acknowledge: two events, two stops; a third and a
    fourth defect in the very same frames as each other: two more events."""
    plc = SimulatedPlc().start()
    store_dir = tmp_path / "store"
    a = AlertUnderTest(tmp_path / "run", store_dir, plc_cfg(plc.port))
    store = Store.from_config(StoreConfig(path=store_dir, fsync=False))
    try:
        a.stats(lambda s: s.get("actions", {}).get("plc_connected"))
        # defect A at tube column 500 (frame column 500 at frame 0) moves left with the web
        for seq in range(0, 4):
            a.send(seq, True, at=(100, x_of(500, seq)), pos=pos(seq))
        wait_for(lambda: plc.coil(0), timeout=10)
        wait_for(lambda: store.list_events()["total"] == 1)
        store.request_ack("anna", note="hole mended")
        wait_for(lambda: not plc.coil(0), timeout=10)
        a.stats(lambda s: s["actions"].get("acks") == 1 and not s["actions"]["latched"])
        # defect B: another place of the tube (column 1100), 13 frames after A was last seen
        for seq in range(16, 19):
            a.send(seq, True, at=(300, x_of(1100, seq)), pos=pos(seq))
        wait_for(lambda: plc.coil(0), timeout=10)
        wait_for(lambda: store.list_events()["total"] == 2)
        store.request_ack("anna")
        wait_for(lambda: not plc.coil(0), timeout=10)
        # C and D in the same frames, far apart: two events
        for seq in range(19, 22):
            a.send(seq, True, at=(40, x_of(708, seq)), more=((440, x_of(1168, seq)),), pos=pos(seq))
        wait_for(lambda: plc.coil(0), timeout=10)
        s = a.stats(lambda s: s.get("inspected") == 10 and s["actions"]["pending"] == 0)
        assert s["cameras"]["c"]["events"] == 4, s["cameras"]["c"]
        wait_for(lambda: store.list_events()["total"] == 4)
        events = sorted(store.list_events()["items"], key=lambda e: e["id"])
        assert [(e["seq"], e["action"]) for e in events] == [(1, "stop"), (17, "stop"), (20, "stop"), (20, "stop")]
        assert [e["acknowledged"] for e in events] == [True, True, False, False]
        tracks = [store.get_event(e["id"])["record"]["track"] for e in events]
        assert [tr["tube_x"] for tr in tracks] == [500.0, 1100.0, 708.0, 1168.0]
        cam = s["cameras"]["c"]
        assert cam["position"] == {"source": "test", "ok": 10} and cam["tracks_total"] == 4
    finally:
        assert a.stage.stop() == 0
        plc.stop()
