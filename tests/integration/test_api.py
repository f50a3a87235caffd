"""The HTTP API against real parts: the real FastAPI app (over a real uvicorn server on a loopback port,
and FastAPI's TestClient for the endpoint matrix), a real SQLite store holding events whose pictures
come from the knit simulator through the alert stage's own drawing code, and the action runner as the
alert stage runs it (so an acknowledge really resets the latch)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.api.security import ApiError, load_token
from knitwatch.pipeline.actions import ActionRunner, LogDriver
from knitwatch.pipeline.store.database import Store
from tests.helpers.api import EVENTS, SNAPSHOT, TOKEN, make_settings


def client(settings: Settings, view: StaticView | None = None, token: str | None = None) -> TestClient:
    app = create_app(settings, view or StaticView(SNAPSHOT, healthy=True), token=token)
    return TestClient(app, base_url="http://127.0.0.1:8080")


def test_events_list_filters_and_pagination(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    c = client(settings)
    r = c.get("/api/events")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == len(EVENTS)
    assert [e["id"] for e in body["items"]] == ids[::-1]  # newest first
    first = body["items"][0]
    assert first["urls"] == {k: f"/api/events/{first['id']}/{k}" for k in ("frame", "overlay", "mask", "thumb")}
    assert body["next_offset"] is None

    def q(**params: object) -> list[int]:
        r = c.get("/api/events", params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()["items"]]

    assert q(camera="cam1") == [ids[5], ids[3], ids[2]]
    assert q(action="stop") == [ids[6], ids[4], ids[2], ids[0]]
    assert q(severity="minor") == [ids[5], ids[1]]
    assert q(since="1h") == [ids[6], ids[5], ids[4]]
    assert q(since="150m", until="60m") == [ids[3], ids[2]]
    now = time.time()
    assert q(since=str(int(now - 100 * 60)), until=str(int(now - 30 * 60))) == [ids[4], ids[3]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 250 * 60))
    assert q(until=iso) == [ids[0]]
    # pagination: three pages of 3, 3, 1
    pages, offset = [], 0
    while offset is not None:
        r = c.get("/api/events", params={"limit": 3, "offset": offset}).json()
        pages.append([e["id"] for e in r["items"]])
        offset = r["next_offset"]
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[0:1]]
    # flags
    assert c.post(f"/api/events/{ids[2]}/keep", json={"keep": True}).json() == {"id": ids[2], "keep": True}
    assert c.post(f"/api/events/{ids[3]}/keep").json()["keep"] is True  # no body: keep
    assert q(keep=True) == [ids[3], ids[2]]
    assert c.post(f"/api/events/{ids[3]}/keep", json={"keep": False}).status_code == 200
    assert q(keep=True) == [ids[2]]
    assert q(keep=False, camera="cam1") == [ids[5], ids[3]]
    r = c.post(f"/api/events/{ids[1]}/false-positive", json={"by": "maria", "note": "a shadow"})
    assert r.json() == {"id": ids[1], "false_positive": True}
    assert q(false_positive=True) == [ids[1]]
    e = c.get(f"/api/events/{ids[1]}").json()
    assert e["false_positive"] and e["fp_by"] == "maria" and e["fp_note"] == "a shadow"
    assert q(acknowledged=False, action="alarm") == [ids[5], ids[1]]
    # bad filters: clear 400/422 answers
    assert q(camera="retired-cam") == []  # events of cameras no longer configured stay searchable
    assert c.get("/api/events", params={"camera": "../cam0"}).status_code == 422
    r = c.get("/api/events", params={"since": "last tuesday"})
    assert r.status_code == 422 and r.json()["detail"].startswith("since: cannot read")
    assert c.get("/api/events", params={"limit": 0}).status_code == 422
    assert c.get("/api/events", params={"limit": 501}).status_code == 422
    assert c.get("/api/events", params={"offset": -1}).status_code == 422
    assert c.get("/api/events", params={"action": "explode"}).status_code == 422
    assert c.get("/api/events", params={"severity": "x' OR 1=1 --"}).status_code == 422


def test_event_detail_and_pictures(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    c = client(settings)
    e = c.get(f"/api/events/{ids[0]}").json()
    assert e["camera"] == "cam0" and e["action"] == "stop" and e["record"]["truth"] == {"kind": "hole"}
    assert e["record"]["regions"], "the simulated defect gave regions"
    magic = {"frame": b"\x89PNG", "mask": b"\x89PNG", "overlay": b"\xff\xd8", "thumb": b"\xff\xd8"}
    for kind, head in magic.items():
        r = c.get(f"/api/events/{ids[0]}/{kind}")
        assert r.status_code == 200, kind
        assert r.content.startswith(head)
        assert r.headers["content-type"] == ("image/png" if head == b"\x89PNG" else "image/jpeg")
        assert r.headers["x-content-type-options"] == "nosniff"
    frame = cv2.imdecode(np.frombuffer(c.get(f"/api/events/{ids[0]}/frame").content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert frame.shape[:2] == (256, 512)
    mask = cv2.imdecode(np.frombuffer(c.get(f"/api/events/{ids[0]}/mask").content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) <= {0, 255} and mask.any()
    # unknown event / missing file / bad kind
    assert c.get("/api/events/999999").status_code == 404
    assert c.get("/api/events/999999/frame").status_code == 404
    assert c.post("/api/events/999999/keep", json={"keep": True}).status_code == 404
    assert c.post("/api/events/999999/false-positive", json={}).status_code == 404
    (settings.store.path / "events").joinpath(next(p for p in _event_dirs(settings, ids[0]))).joinpath(
        "mask.png").unlink()
    assert c.get(f"/api/events/{ids[0]}/mask").status_code == 404
    assert c.get(f"/api/events/{ids[0]}").json()["files"]["mask"] is False
    assert c.get(f"/api/events/{ids[0]}/record").status_code == 400
    assert c.get(f"/api/events/{ids[0]}/event.json").status_code == 400


def _event_dirs(settings: Settings, eid: int) -> list[str]:
    root = settings.store.path / "events"
    return [str(p.relative_to(root)) for p in root.glob(f"*/{eid:08d}")]


def test_traversal_and_bad_ids_never_reach_the_file_system(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    secret = settings.store.path.parent / "secret.txt"
    secret.write_text("do not serve")
    c = client(settings)
    bad_ids = ["0", "-1", "1.0", "0x1", "1e3", "%31%00", "1%20", "abc", "١", "9" * 40, "1;DROP TABLE events",
               "..", "%2e%2e", "..%2f..%2fsecret.txt"]
    for bad in bad_ids:
        for suffix in ("", "/frame"):
            r = c.get(f"/api/events/{bad}{suffix}")
            assert r.status_code in (400, 404), (bad, suffix, r.status_code)
            assert b"do not serve" not in r.content
    for kind in ("..%2f..%2f..%2fsecret.txt", "..", "%2e%2e%2fevents.sqlite3", "frame%00", "FRAME", "frame.png",
                 "..%5c..%5csecret.txt"):
        r = c.get(f"/api/events/{ids[0]}/{kind}")
        if kind == "..":  # the client resolves the dot segment: /api/events/1/.. is /api/events/, the listing
            assert r.status_code == 200 and "items" in r.json()
            continue
        assert r.status_code in (400, 404), (kind, r.status_code)
        assert b"do not serve" not in r.content and b"SQLite" not in r.content
    for path in ("/static/../../secret.txt", "/static/%2e%2e/%2e%2e/secret.txt", "/static/..%2f..%2fapi.py",
                 "/api/events/1/../../../secret.txt"):
        r = c.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert b"do not serve" not in r.content and b"import" not in r.content
    # a tampered index row cannot point outside the store either
    import sqlite3

    db = sqlite3.connect(settings.store.path / "events.sqlite3")
    db.execute("UPDATE events SET dir = '../../..' WHERE id = ?", (ids[1],))
    db.commit()
    db.close()
    assert c.get(f"/api/events/{ids[1]}/frame").status_code == 404


def test_auth_token_on_api_and_metrics(populated: tuple[Settings, list[int]], tmp_path: Path) -> None:
    settings, ids = populated
    c = client(settings, token=TOKEN)
    protected = ["/api/stats", "/api/events", f"/api/events/{ids[0]}", f"/api/events/{ids[0]}/thumb", "/api/alarm",
                 "/metrics"]
    for path in protected:
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get(path, headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    for post in (f"/api/events/{ids[0]}/keep", f"/api/events/{ids[0]}/false-positive", "/api/alarm/ack"):
        assert c.post(post, json={}).status_code == 401
    # nothing was recorded unauthenticated
    assert Store.from_config(StoreConfig(path=settings.store.path), create=False).list_acks() == []
    # open without a token: the page, its files, the health check
    for path in ("/", "/static/app.js", "/static/style.css", "/healthz"):
        assert c.get(path).status_code == 200, path
    # token from a file (the first line), as systemd credentials deliver it
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    assert load_token(ApiConfig(host="0.0.0.0", token_file=tf)) == TOKEN
    tf.write_text("")
    with pytest.raises(ApiError, match="empty"):
        load_token(ApiConfig(host="0.0.0.0", token_file=tf))
    with pytest.raises(ApiError, match="cannot read"):
        load_token(ApiConfig(host="0.0.0.0", token_file=tmp_path / "missing"))
    assert load_token(ApiConfig()) is None


def test_loopback_guards_against_dns_rebinding_and_cross_site_posts(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    c = client(settings)
    assert c.get("/api/stats", headers={"Host": "evil.example:8080"}).status_code == 421
    assert c.get("/api/stats", headers={"Host": "localhost:8080"}).status_code == 200
    assert c.get("/api/stats", headers={"Host": "[::1]:8080"}).status_code == 200
    r = c.post(f"/api/events/{ids[0]}/keep", json={"keep": True}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = c.post("/api/alarm/ack", json={}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert c.post(f"/api/events/{ids[0]}/keep", json={"keep": True},
                  headers={"Origin": "http://127.0.0.1:8080"}).status_code == 200
    h = c.get("/").headers
    assert "frame-ancestors 'none'" in h["content-security-policy"] and h["x-frame-options"] == "DENY"


def test_stats_health_metrics(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    view = StaticView(SNAPSHOT, healthy=True)
    c = client(settings, view)
    st = c.get("/api/stats").json()
    assert st["healthy"] and st["ready"] and st["uptime_s"] == 3725.0
    assert st["alarm"]["latched"] and st["alarm"]["stop"] == ["cam0", "cam1"] and st["alarm"]["alarm"] == ["cam0",
                                                                                                          "cam1"]
    assert st["cameras"]["cam0"]["last_event"]["id"] == ids[6]
    assert st["cameras"]["cam1"]["last_event"]["id"] == ids[5]
    assert st["cameras"]["cam0"]["latched"] == {"stop": True, "alarm": True}
    assert st["cameras"]["cam0"]["fps"] == 2.0
    assert st["store"]["events"] == len(EVENTS)
    assert st["gpu"]["devices"][0]["utilization_percent"] == 37

    r = c.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    view.healthy = False
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unhealthy"

    text = c.get("/metrics").text
    for line in ('knitwatch_camera_fps{camera="cam0"} 2.0', 'knitwatch_inspection_coverage_ratio{camera="cam1"} 0.94',
                 'knitwatch_frames_captured_total{camera="cam0"} 7400.0',
                 'knitwatch_frames_dropped_total{camera="cam1"} 89.0',
                 'knitwatch_defect_events_total{camera="cam0"} 4.0',
                 'knitwatch_latency_seconds{camera="cam1",quantile="0.99"} 0.512',
                 'knitwatch_stage_restarts_total{stage="infer.0"} 1.0', 'knitwatch_healthy 0.0',
                 'knitwatch_frames_lost_in_flight_total{stage="infer.0"} 7.0',
                 'knitwatch_frames_lost_in_flight_total{stage="alert"} 0.0',
                 'knitwatch_plc_connected{driver="modbus"} 1.0', 'knitwatch_plc_failures_total 2.0',
                 'knitwatch_alarm_latched{action="stop",camera="cam0"} 1.0',
                 f"knitwatch_store_events {float(len(EVENTS))}",
                 'knitwatch_gpu_utilization_ratio{gpu="0",name="NVIDIA Test"} 0.37',
                 'knitwatch_gpu_memory_used_bytes{gpu="0",name="NVIDIA Test"} 2e+09',
                 'knitwatch_cuda_memory_allocated_bytes{stage="infer.0"} 1.23456789e+08',
                 'knitwatch_model_batch_seconds{quantile="0.5",stage="infer.0"} 0.08'):
        assert line in text, line
    # without a GPU the GPU series are absent, not zero
    no_gpu = {k: v for k, v in SNAPSHOT.items() if k != "gpu"}
    text = client(settings, StaticView(no_gpu, healthy=True)).get("/metrics").text
    assert "knitwatch_gpu" not in text and "cuda_memory" not in text
    assert "knitwatch_healthy 1.0" in text


def test_store_not_there_yet(tmp_path: Path) -> None:
    c = client(make_settings(tmp_path))
    r = c.get("/api/events")
    assert r.status_code == 503 and "not available" in r.json()["detail"]
    st = c.get("/api/stats").json()  # stats still answer: the daemon may be starting
    assert st["store"] is None and st["alarm"]["latched"] is False
    (tmp_path / "store").mkdir()
    Store.from_config(StoreConfig(path=tmp_path / "store")).close()
    assert c.get("/api/events").json()["total"] == 0  # opened once it exists


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_real_server_ack_resets_the_latch(populated: tuple[Settings, list[int]]) -> None:
    """uvicorn on a free loopback port; the action runner (as in the alert stage) applies the ack."""
    settings, ids = populated
    store = Store.from_config(StoreConfig(path=settings.store.path, fsync=False), create=False)
    runner = ActionRunner(LogDriver(), store=store, ack_poll_s=0.1).start()
    app = create_app(settings, StaticView(SNAPSHOT, healthy=True), token=TOKEN)
    server = ApiServer(app, "127.0.0.1", 0).start()
    try:
        assert server.port > 0
        base = server.url
        code, st = http("GET", f"{base}/api/stats", token=TOKEN)
        assert code == 200 and st["alarm"]["latched"]
        assert http("POST", f"{base}/api/alarm/ack", {"camera": "cam9"}, token=TOKEN)[0] == 400
        code, res = http("POST", f"{base}/api/alarm/ack?wait=5", {"by": "maria", "camera": "cam1", "note": "fixed"},
                         token=TOKEN)
        assert code == 200, res
        assert res["applied"] and res["cleared"], res
        assert res["latched_before"]["stop"] == ["cam0", "cam1"]
        assert res["latched"] == {"stop": ["cam0"], "alarm": ["cam0"]}
        assert res["ack"]["by"] == "maria" and res["ack"]["note"] == "fixed"
        code, alarm = http("GET", f"{base}/api/alarm", token=TOKEN)
        assert alarm["stop"] == ["cam0"] and alarm["acks"][0]["id"] == res["ack_id"]
        code, res = http("POST", f"{base}/api/alarm/ack?wait=5", {}, token=TOKEN)
        assert res["cleared"] and res["latched"] == {"stop": [], "alarm": []} and res["ack"]["by"] == "web"
        code, ev = http("GET", f"{base}/api/events?acknowledged=false&action=stop", token=TOKEN)
        assert ev["total"] == 0
        # latency of the API on this machine (reported in the README)
        t = []
        for _ in range(30):
            t0 = time.perf_counter()
            assert http("GET", f"{base}/api/events?limit=24", token=TOKEN)[0] == 200
            t.append(time.perf_counter() - t0)
        print(f"GET /api/events?limit=24 p50 {1000 * sorted(t)[15]:.1f} ms")
    finally:
        server.stop()
        runner.stop()
        store.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/healthz", timeout=2)


def test_port_in_use_is_an_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    a = ApiServer(create_app(settings), "127.0.0.1", 0).start()
    try:
        with pytest.raises(ApiError, match="cannot listen"):
            ApiServer(create_app(settings), "127.0.0.1", a.port).start()
    finally:
        a.stop()


def test_gpu_telemetry_reads_nvml_or_is_absent() -> None:
    """On a GPU host: utilisation and memory per device from NVML (nvidia-ml-py); without one: nothing,
    and no error - the stats and metrics then simply have no GPU fields."""
    from knitwatch.daemon.telemetry import GpuTelemetry, gpu_stats

    tel = GpuTelemetry()
    devices = tel.read()
    try:
        if not devices:
            assert tel.reason  # why not, for doctor
            assert gpu_stats(tel, {"infer.0": {"model_ms": {}}}) is None
            assert gpu_stats(tel, {"infer.0": {"cuda_memory_allocated_bytes": 1024}}) == {
                "cuda_memory_allocated_bytes": {"infer.0": 1024}}
            return
        for d in devices:
            assert d["memory_total_bytes"] > 0 and 0 <= d["memory_used_bytes"] <= d["memory_total_bytes"]
            assert d["name"] and d["uuid"].startswith(("GPU-", "MIG-"))
            if "utilization_percent" in d:
                assert 0 <= d["utilization_percent"] <= 100
        assert [d["index"] for d in gpu_stats(tel, {})["devices"]] == [d["index"] for d in devices]
    finally:
        tel.close()
