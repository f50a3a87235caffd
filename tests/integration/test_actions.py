"""Action drivers and the action runner against real parts: a pymodbus TCP server on loopback as the
PLC, a real OPC UA server (when asyncua is installed), real subprocesses for the command driver."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from knitwatch.config.settings import PlcConfig
from knitwatch.pipeline.actions import ActionError, ActionRunner, BrokenDriver, Job, LogDriver, build_driver, event_env
from knitwatch.pipeline.actions.command import CommandDriver
from knitwatch.pipeline.actions.latch import LATCH_FILE, UNKNOWN_CAMERA, post_ack_request, read_view
from knitwatch.pipeline.actions.modbus import ModbusDriver
from knitwatch.pipeline.actions.simplc import SimulatedPlc
from knitwatch.pipeline.decision.regions import Region
from knitwatch.pipeline.decision.severity import SeverityClass, classify
from tests.helpers.net import free_port, sample, wait_for


def test_severity_classes() -> None:
    classes = [SeverityClass("major", "stop", min_area_px=200), SeverityClass("intense", "stop", min_peak_ratio=2.0),
               SeverityClass("minor", "alarm")]
    small = Region((0, 0, 5, 5), 25, 1.2)
    big = Region((0, 0, 20, 20), 400, 1.1)
    hot = Region((0, 0, 5, 5), 25, 2.5)
    assert classify([small], 1.0, classes).name == "minor"
    assert classify([small, big], 1.0, classes).name == "major"
    assert classify([hot], 1.0, classes).action == "stop"
    assert classify([hot], 2.0, classes).name == "minor"  # the ratio is to the image threshold
    assert classify([small], 1.0, classes[:2]).action == "log"  # no class: only logged
    with pytest.raises(ValueError):
        SeverityClass.from_dict({"name": "x", "action": "explode"})


def test_modbus_driver_writes_reads_back_and_beats(plc: SimulatedPlc) -> None:
    d = ModbusDriver(PlcConfig(driver="modbus", port=plc.port, stop_address=3, alarm_address=4, heartbeat_address=5))
    assert d.set_outputs(True, False)["read_back"]
    assert plc.coil(3) and plc.coil(4)
    assert d.read_outputs() == (True, True)
    d.heartbeat(1)
    assert plc.coil(5)
    d.heartbeat(2)
    assert not plc.coil(5)
    d.set_outputs(False, True)
    assert not plc.coil(3) and plc.coil(4)
    d.set_outputs(False, False)
    assert not plc.coil(4)

    r = ModbusDriver(PlcConfig(driver="modbus", port=plc.port, output="register", stop_address=10,
                               heartbeat_address=11, stop_value=7))
    r.set_outputs(True, True)
    assert plc.register(10) == 7 and r.read_outputs() == (True, True)
    r.heartbeat(300)
    assert plc.register(11) == 300
    r.set_outputs(False, False)
    assert plc.register(10) == 0

    with pytest.raises(ActionError, match="refused"):
        ModbusDriver(PlcConfig(driver="modbus", port=plc.port, stop_address=100)).set_outputs(True, False)  # no coil
    plc.stop()
    with pytest.raises(ActionError):
        d.set_outputs(True, False)
    d.close()
    r.close()


def test_runner_retries_until_the_plc_comes_up_and_keeps_the_latch(tmp_path: Path) -> None:
    port = free_port()
    cfg = PlcConfig(driver="modbus", port=port, stop_address=0, heartbeat_address=1, timeout_s=0.5, heartbeat_s=0.1,
                    heartbeat_idle_s=0, retry_initial_s=0.05, retry_max_s=0.2)
    driver = ModbusDriver(cfg)
    runner = ActionRunner(driver, cfg).start()
    plc = None
    try:
        runner.submit(Job("event", "stop", "c", event_id=1))
        wait_for(lambda: runner.stats()["failures"] >= 3)
        s = runner.stats()
        assert s["pending"] == 1 and not s["plc_connected"] and s["latched"] and "cannot connect" in s["last_error"]
        assert s["retry_in_s"] <= 0.2 + 1e-6  # the back-off is capped at retry_max_s
        plc = SimulatedPlc(port=port).start()
        wait_for(lambda: plc.coil(0), timeout=10)
        wait_for(lambda: runner.stats()["pending"] == 0 and runner.stats()["plc_connected"])
        beats = sample(lambda: plc.coil(1), 0.6)
        assert True in beats and False in beats  # the heartbeat toggles

        plc.restart()  # the PLC restarts and forgets its coils: the stop lands again
        wait_for(lambda: plc.coil(0), timeout=3)
        assert runner.stats().get("outputs_rewritten", 0) + runner.stats()["failures"] >= 1

        runner.acknowledge("anna", note="hole mended")
        wait_for(lambda: not plc.coil(0), timeout=3)
        # the snapshot is published after the loop's turn: wait for the one that counts the acknowledge
        wait_for(lambda: runner.stats().get("acks") == 1 and runner.stats()["pending"] == 0)
        s = runner.stats()
        assert not s["latched"] and s["confirmed"] >= 2
    finally:
        runner.stop(flush_s=0.5)
    beats = sample(lambda: plc.coil(1), 0.4)
    assert len(set(beats)) == 1  # knitwatch gone: the heartbeat stands still, the PLC fails safe
    plc.stop()


RELAY = textwrap.dedent("""
    import json, os, pathlib, sys
    out = pathlib.Path(sys.argv[1])
    marker = out / "failed-once"
    if not marker.exists():
        marker.write_text("x")
        sys.stderr.write("relay busy")
        sys.exit(3)
    n = len(list(out.glob("call-*.json")))
    env = {k: v for k, v in os.environ.items() if k.startswith("KNITWATCH_")}
    (out / "call.tmp").write_text(json.dumps(env))
    (out / "call.tmp").rename(out / f"call-{n}.json")
""")


def test_command_driver_runs_a_program_with_the_event_in_its_environment(tmp_path: Path) -> None:
    script = tmp_path / "relay.py"
    script.write_text(RELAY)
    cfg = PlcConfig(driver="command", command=[sys.executable, str(script), str(tmp_path)], retry_initial_s=0.05)
    runner = ActionRunner(CommandDriver(cfg), cfg).start()
    try:
        record = {"event_id": 42, "camera": "cam0", "severity": "major", "action": "stop", "image_score": 2.5,
                  "seq": 17, "time": "2026-01-01T00:00:00.000Z", "t_wall_ns": 1767225600000000000,
                  "regions": [{"bbox": [1, 2, 30, 40], "area": 300, "peak": 2.5}, {"bbox": [0, 0, 2, 2], "area": 4,
                                                                                     "peak": 1.1}],
                  "event_dir": "/var/lib/knitwatch/events/2026-01-01/00000042"}
        runner.submit(Job("event", "stop", "cam0", event_id=42, env=event_env(record)))
        wait_for(lambda: (tmp_path / "call-0.json").exists(), timeout=10)
        env = json.loads((tmp_path / "call-0.json").read_text())
        assert env["KNITWATCH_EVENT_ID"] == "42" and env["KNITWATCH_CAMERA"] == "cam0"
        assert env["KNITWATCH_SEVERITY"] == "major" and env["KNITWATCH_ACTION"] == "stop"
        assert float(env["KNITWATCH_SCORE"]) == 2.5 and env["KNITWATCH_SEQ"] == "17"
        assert env["KNITWATCH_AREA_PX"] == "300" and env["KNITWATCH_BBOX"] == "1,2,30,40"
        assert env["KNITWATCH_REGIONS"] == "2" and env["KNITWATCH_LATCHED"] == "1"
        assert env["KNITWATCH_EVENT_DIR"].endswith("00000042") and env["KNITWATCH_TIME"].startswith("2026")
        wait_for(lambda: runner.stats()["pending"] == 0)
        s = runner.stats()
        assert s["failures"] == 1 and "exited with code 3: relay busy" in s["last_error"]

        runner.acknowledge("bob", note="checked")
        wait_for(lambda: (tmp_path / "call-1.json").exists(), timeout=10)
        env = json.loads((tmp_path / "call-1.json").read_text())
        assert env["KNITWATCH_ACTION"] == "ack" and env["KNITWATCH_ACK_BY"] == "bob"
        assert env["KNITWATCH_ACK_NOTE"] == "checked" and env["KNITWATCH_LATCHED"] == "0"
    finally:
        runner.stop()

    cfg = PlcConfig(driver="command", command=["/nonexistent/relay"], retry_initial_s=0.05, retry_max_s=0.1)
    broken = ActionRunner(CommandDriver(cfg), cfg).start()
    try:
        broken.submit(Job("event", "alarm", "cam0", event_id=1))
        wait_for(lambda: broken.stats()["failures"] >= 2)
        assert "cannot run command" in broken.stats()["last_error"] and broken.stats()["pending"] == 1
    finally:
        broken.stop(flush_s=0)


def test_log_driver_and_a_driver_that_cannot_load() -> None:
    runner = ActionRunner(LogDriver()).start()
    try:
        runner.submit(Job("event", "stop", "c", event_id=-1))
        wait_for(lambda: runner.stats().get("confirmed") == 1)
        assert runner.stats()["latched"] and runner.stats()["plc_connected"]
    finally:
        runner.stop()
    broken = ActionRunner(BrokenDriver("opcua", "asyncua missing"), PlcConfig(retry_initial_s=0.05, retry_max_s=0.1)
                          ).start()
    try:
        assert broken.submit(Job("event", "stop", "c", event_id=-1))  # never blocks
        wait_for(lambda: broken.stats()["failures"] >= 2)
        assert broken.stats()["last_error"] == "asyncua missing" and broken.stats()["pending"] == 1
    finally:
        broken.stop(flush_s=0)
    with pytest.raises(ValueError):
        build_driver(PlcConfig.model_construct(driver="carrier-pigeon"))  # the schema refuses it; unchecked here


def test_opcua_driver_writes_nodes(tmp_path: Path) -> None:
    pytest.importorskip("asyncua")
    from asyncua import ua
    from asyncua.sync import Server

    port = free_port()
    server = Server()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/knitwatch/")
    idx = server.register_namespace("urn:knitwatch:test")
    obj = server.nodes.objects.add_object(idx, "Machine")
    nodes = {}
    for name in ("Stop", "Alarm", "Heartbeat"):
        nodes[name] = obj.add_variable(ua.NodeId(name, idx), name, False, ua.VariantType.Boolean)
        nodes[name].set_writable()
    server.start()
    driver = build_driver(PlcConfig(driver="opcua", opcua_url=f"opc.tcp://127.0.0.1:{port}/knitwatch/",
                                    opcua_stop_node=f"ns={idx};s=Stop", opcua_alarm_node=f"ns={idx};s=Alarm",
                                    opcua_heartbeat_node=f"ns={idx};s=Heartbeat", timeout_s=2.0))
    try:
        driver.set_outputs(True, False)
        assert nodes["Stop"].read_value() is True and nodes["Alarm"].read_value() is True
        assert driver.read_outputs() == (True, True)
        driver.heartbeat(1)
        assert nodes["Heartbeat"].read_value() is True
        driver.set_outputs(False, False)
        assert nodes["Stop"].read_value() is False
    finally:
        driver.close()
        server.stop()
    with pytest.raises(ActionError):
        driver.set_outputs(True, False)  # server gone
    driver.shutdown()


# ---------------------------------------------------------------------- the latch survives restarts and faults


def modbus_cfg(plc: SimulatedPlc) -> PlcConfig:
    return PlcConfig(driver="modbus", port=plc.port, stop_address=0, heartbeat_address=1, timeout_s=0.5,
                     heartbeat_s=0.1, heartbeat_idle_s=0, retry_initial_s=0.05, retry_max_s=0.2)


def test_a_stop_the_plc_holds_stays_latched_until_acknowledged(tmp_path: Path, plc: SimulatedPlc) -> None:
    cfg = modbus_cfg(plc)
    before = ModbusDriver(cfg)
    before.set_outputs(True, False)  # a stop knitwatch has no record of (its store and latch file lost)
    before.close()
    runner = ActionRunner(ModbusDriver(cfg), cfg, latch_dir=tmp_path).start()
    try:
        wait_for(lambda: runner.stats().get("latched_from_plc") == 1 and runner.stats()["pending"] == 0)
        assert all(sample(lambda: plc.coil(0), 0.5))  # never written 0 on its own
        assert runner.stats()["latched_cameras"]["stop"] == [UNKNOWN_CAMERA]
        assert read_view(tmp_path)["stop"] == [UNKNOWN_CAMERA]
        runner.acknowledge("anna", camera="c")  # one camera's acknowledge does not cover a stop of unknown origin
        wait_for(lambda: runner.stats().get("acks") == 1)
        assert plc.coil(0)
        runner.acknowledge("anna")
        wait_for(lambda: not plc.coil(0), timeout=3)
    finally:
        runner.stop()
    again = ActionRunner(ModbusDriver(cfg), cfg, latch_dir=tmp_path).start()
    try:
        wait_for(lambda: again.stats()["plc_connected"] and again.stats()["pending"] == 0)
        assert not any(sample(lambda: plc.coil(0), 0.3)) and not again.stats()["latched"]
    finally:
        again.stop()


def test_a_corrupt_latch_file_latches_the_stop(tmp_path: Path, plc: SimulatedPlc) -> None:
    (tmp_path / LATCH_FILE).write_text('{"knitwatch": "latch", "state": {"latch": ')  # torn
    cfg = modbus_cfg(plc)
    runner = ActionRunner(ModbusDriver(cfg), cfg, latch_dir=tmp_path).start()
    try:
        wait_for(lambda: plc.coil(0), timeout=3)  # fail safe: the stop goes on
        s = runner.stats()
        assert s["latch_file_corrupt"] == 1 and s["latched_cameras"]["stop"] == [UNKNOWN_CAMERA]
        assert read_view(tmp_path)["ok"] and read_view(tmp_path)["stop"] == [UNKNOWN_CAMERA]  # written whole again
        runner.acknowledge("anna")
        wait_for(lambda: not plc.coil(0), timeout=3)
    finally:
        runner.stop()


def test_an_acknowledge_whose_reset_did_not_land_is_applied_after_a_restart(tmp_path: Path,
                                                                          plc: SimulatedPlc) -> None:
    cfg = modbus_cfg(plc)
    first = ActionRunner(ModbusDriver(cfg), cfg, latch_dir=tmp_path).start()
    first.submit(Job("event", "stop", "c", event_id=5))
    wait_for(lambda: plc.coil(0), timeout=3)
    wait_for(lambda: first.stats()["pending"] == 0)
    first.stop()
    # acknowledged (through the mailbox) while the PLC cannot be reached; knitwatch stops before the reset lands
    cut = ActionRunner(BrokenDriver("modbus", "PLC unreachable"), cfg, latch_dir=tmp_path).start()
    try:
        assert cut.stats()["latched_events"]["stop"] == {"c": [5]}
        req = post_ack_request(tmp_path, by="anna", camera=None, note="mended", covers_seq=read_view(tmp_path)[
            "latch_seq"])
        wait_for(lambda: read_view(tmp_path)["stop"] == [] and cut.stats().get("acks") == 1)
        assert any("PLC" in r for r in cut.stats()["degraded"])
    finally:
        cut.stop(flush_s=0)
    assert plc.coil(0)
    (entry,) = read_view(tmp_path)["acks"]
    assert entry["token"] == req["token"] and entry["released"] == [5] and entry["cleared_ns"] is None
    then = ActionRunner(ModbusDriver(cfg), cfg, latch_dir=tmp_path).start()
    try:
        wait_for(lambda: not plc.coil(0), timeout=3)  # the acknowledge is recorded: its reset lands now
        assert not then.stats()["latched"] and not then.stats().get("latched_from_plc")
    finally:
        then.stop()


def test_a_mailbox_acknowledge_covers_only_what_was_latched_when_it_was_asked(tmp_path: Path) -> None:
    runner = ActionRunner(LogDriver(), latch_dir=tmp_path).start()
    try:
        runner.submit(Job("event", "stop", "a", event_id=1))
        wait_for(lambda: read_view(tmp_path)["latch_seq"] == 1)
        seen = read_view(tmp_path)["latch_seq"]
        runner.submit(Job("event", "alarm", "b", event_id=2))  # latched after the operator looked
        wait_for(lambda: read_view(tmp_path)["latch_seq"] == 2)
        post_ack_request(tmp_path, by="bob", camera=None, note="", covers_seq=seen)
        wait_for(lambda: runner.stats().get("acks") == 1)
        assert runner.stats()["latched_events"] == {"stop": {}, "alarm": {"b": [2]}}
        post_ack_request(tmp_path, by="bob", camera="b", note="", covers_seq=None)
        wait_for(lambda: not read_view(tmp_path)["alarm"])
        assert [a["released"] for a in read_view(tmp_path)["acks"]] == [[1], [2]]
    finally:
        runner.stop()


def test_an_acknowledge_the_index_holds_is_proof_after_a_restart(tmp_path: Path, plc: SimulatedPlc) -> None:
    from knitwatch.config.settings import StoreConfig
    from knitwatch.pipeline.store.database import Store

    cfg = modbus_cfg(plc)
    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False))
    eid = store.add_event({}, camera="c", t_wall_ns=1, seq=1, severity="major", action="stop", image_score=2.0,
                          max_area_px=600)
    first = ActionRunner(ModbusDriver(cfg), cfg, store=store, latch_dir=tmp_path).start()
    first.submit(Job("event", "stop", "c", event_id=eid))
    wait_for(lambda: plc.coil(0) and first.stats()["pending"] == 0, timeout=3)
    first.stop()
    # the index took the acknowledge, then knitwatch died before its latch file and the PLC followed
    store.apply_ack(store.request_ack("anna"))
    assert read_view(tmp_path)["stop"] == ["c"] and plc.coil(0)
    then = ActionRunner(ModbusDriver(cfg), cfg, store=store, latch_dir=tmp_path).start()
    try:
        wait_for(lambda: not plc.coil(0), timeout=3)
        assert not then.stats()["latched"] and not then.stats().get("latched_from_plc")
    finally:
        then.stop()
        store.close()
