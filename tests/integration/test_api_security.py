"""Hostile input to the HTTP API (issue 15, items 5 and 6), against the real app: FastAPI's TestClient
for the header and answer checks, a real uvicorn server on a loopback port and raw sockets where the
failure is about what the server reads off the wire (body size, token before body), a real SQLite store
filled as the alert stage fills it. And the logs: an exception logged through the real structlog setup
must not carry the frames' local variables."""

from __future__ import annotations

import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, StoreConfig
from knitwatch.daemon.api.app import ApiServer, create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.api.security import MAX_BODY_BYTES, ApiError, load_token
from knitwatch.daemon.logs import setup_logging
from knitwatch.pipeline.store.database import Store
from knitwatch.pipeline.store.queries import parse_time
from tests.helpers.api import EVENTS, SNAPSHOT, TOKEN, make_settings, populate_store

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def client(settings: Settings, token: str | None = None, view: StaticView | None = None) -> TestClient:
    app = create_app(settings, view or StaticView(SNAPSHOT, healthy=True), token=token)
    return TestClient(app, base_url="http://127.0.0.1:8080")


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Settings, list[int]]:
    """A real store with three small events (these tests are about the requests, not the pictures)."""
    settings = make_settings(tmp_path)
    return settings, populate_store(settings.store.path, EVENTS[:3], width=160, height=96)


def acks(settings: Settings) -> list[dict]:
    store = Store.from_config(StoreConfig(path=settings.store.path), create=False)
    try:
        return store.list_acks()
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- cross-site


def test_origin_null_and_cross_site_fetches_cannot_post(populated: tuple[Settings, list[int]]) -> None:
    """A sandboxed iframe or a data: page sends ``Origin: null``: its acknowledge must not clear the stop."""
    settings, ids = populated
    c = client(settings)
    for headers in ({"Origin": "null"}, {"Origin": "NULL"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"},
                    {"Origin": "file://"}):
        r = c.post("/api/alarm/ack", json={"by": "evil"}, headers=headers)
        assert r.status_code == 403, (headers, r.status_code)
        r = c.post(f"/api/events/{ids[0]}/keep", json={"keep": True}, headers=headers)
        assert r.status_code == 403, headers
    assert acks(settings) == []  # nothing was recorded: the latch stays
    assert not c.get(f"/api/events/{ids[0]}").json()["keep"]
    # the page itself (same origin) and tools without an Origin (curl, the CLI) may post
    ok = c.post(f"/api/events/{ids[0]}/keep", json={"keep": True},
                headers={"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200
    assert c.post(f"/api/events/{ids[1]}/keep", json={"keep": True}).status_code == 200
    # reading stays possible from anywhere the token (here: loopback) allows
    assert c.get("/api/stats", headers={"Origin": "null"}).status_code == 200


# ---------------------------------------------------------------------------------------------- body size


@pytest.fixture
def server(populated: tuple[Settings, list[int]]) -> Iterator[tuple[ApiServer, Settings, list[int]]]:
    settings, ids = populated
    srv = ApiServer(create_app(settings, StaticView(SNAPSHOT, healthy=True), token=TOKEN), "127.0.0.1", 0).start()
    try:
        yield srv, settings, ids
    finally:
        srv.stop()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off ``sock`` (status, headers, body); raises socket.timeout when the server
    does not answer - e.g. because it waits for a body it has not been sent."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def send_head(port: int, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def test_big_body_is_refused_from_content_length_before_it_is_read(server) -> None:
    """300 MB announced: 413 at once, while not one byte of the body has been sent."""
    srv, settings, _ = server
    sock = send_head(srv.port, "POST", "/api/alarm/ack",
                     {**AUTH, "Content-Type": "application/json", "Content-Length": str(300 * 2**20)})
    try:
        status, headers, body = read_response(sock)
        assert sock.recv(1) == b""  # and it hangs up: the announced body is never read
    finally:
        sock.close()
    assert status == 413 and headers["connection"] == "close"
    assert str(MAX_BODY_BYTES) in json.loads(body)["detail"]
    assert acks(settings) == []


def test_big_chunked_body_is_refused_while_streaming(server) -> None:
    """No Content-Length (chunked): the server stops at the limit and answers 413 although the body
    never ends (no final chunk is sent)."""
    srv, settings, _ = server
    sock = send_head(srv.port, "POST", "/api/alarm/ack",
                     {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    try:
        chunk = b"[" + b" " * 16383
        sent = 0
        while sent <= MAX_BODY_BYTES:  # just over the limit, then the body stalls (it never ends)
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, headers, body = read_response(sock)
        assert headers["connection"] == "close" and sock.recv(1) == b""  # it hangs up instead of reading on
    finally:
        sock.close()
    assert status == 413, body
    assert acks(settings) == []


def test_small_bodies_still_work_over_the_wire(server) -> None:
    srv, settings, _ = server
    payload = json.dumps({"by": "maria", "note": "n" * 1900}).encode()
    sock = send_head(srv.port, "POST", "/api/alarm/ack",
                     {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(payload))})
    try:
        sock.sendall(payload)
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert status == 200, body
    assert [a["by"] for a in acks(settings)] == ["maria"]


def test_token_is_checked_before_the_body_is_read(server) -> None:
    """No token: 401 at once, without waiting for (or reading) the announced body."""
    srv, settings, ids = server
    for path in ("/api/alarm/ack", f"/api/events/{ids[0]}/keep"):
        for auth in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong-token-wrong-token"}):
            sock = send_head(srv.port, "POST", path,
                             {**auth, "Content-Type": "application/json", "Content-Length": "50000"})
            try:
                status, headers, _ = read_response(sock)
                assert sock.recv(1) == b""  # hung up: the body is not waited for
            finally:
                sock.close()
            assert status == 401, (path, auth)
            assert headers["www-authenticate"].startswith("Bearer")
    assert acks(settings) == []


def test_validation_errors_never_echo_the_input(populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    c = client(settings)
    marker = "ECHO-ME-" * 4000  # 32 kB, under the body limit
    for path, body in ((f"/api/events/{ids[0]}/keep", {"keep": marker}),
                       (f"/api/events/{ids[0]}/false-positive", {"value": True, "note": marker}),
                       ("/api/alarm/ack", {"by": marker}),
                       ("/api/alarm/ack", [marker])):
        r = c.post(path, json=body)
        assert r.status_code == 422, path
        assert "ECHO-ME" not in r.text and len(r.content) < 2000, r.text[:300]
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "body" in detail  # names the field, a readable sentence
    r = c.post("/api/alarm/ack", content=b'{"by": "ECHO-ME' + b"x" * 100, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "ECHO-ME" not in r.text
    r = c.post("/api/alarm/ack", json={"by": "x"}, headers={"Content-Length": "not-a-number"})
    assert r.status_code == 400
    assert acks(settings) == []


# ---------------------------------------------------------------------------------------------- token


def test_blank_and_short_tokens_are_refused(tmp_path: Path, populated: tuple[Settings, list[int]]) -> None:
    settings, ids = populated
    for bad in (" ", "", "short", "x" * 15, " " * 20, "0123456789 abcdef", "0123456789abcdéf"):
        with pytest.raises(ValidationError, match=r"token") as e:
            ApiConfig(token=bad)
        assert bad.strip() == "" or bad not in str(e.value)  # never printed back
    assert ApiConfig(token="  " + TOKEN + " ").token  # surrounding blanks are not part of it
    tf = tmp_path / "token"
    for bad in ("short\n", "   \n", "0123456789 abcdef\n"):
        tf.write_text(bad)
        with pytest.raises(ApiError, match="at least 16|printable|empty") as e:
            load_token(ApiConfig(host="0.0.0.0", token_file=tf))
        assert str(tf) in str(e.value)
    tf.write_text(TOKEN + "\n")
    assert load_token(ApiConfig(host="0.0.0.0", token_file=tf)) == TOKEN
    with pytest.raises(ApiError, match="at least 16"):
        create_app(settings, token=" ")
    # an empty bearer never matches, whatever the token
    c = client(settings, token=TOKEN)
    for header in ("Bearer ", "Bearer", "bearer  ", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x"):
        assert c.get("/api/stats", headers={"Authorization": header}).status_code == 401, header
    assert c.get("/api/stats", headers=AUTH).status_code == 200


def test_docs_and_schema_are_behind_the_token(populated: tuple[Settings, list[int]]) -> None:
    settings, _ = populated
    c = client(settings, token=TOKEN)
    assert c.get("/api/openapi.json").status_code == 401
    assert c.get("/api/openapi.json", headers=AUTH).json()["info"]["title"] == "knitwatch"
    for path in ("/api/docs", "/docs", "/redoc", "/openapi.json", "/api/redoc"):
        assert c.get(path).status_code in (401, 404), path
        assert c.get(path, headers=AUTH).status_code == 404, path


# ---------------------------------------------------------------------------------------------- paths


ABS_PATH = re.compile(r"(?<![\w.:/-])/(?!api/|static/)(?:[\w.@+~-]+/)+[\w.@+~-]*")


def test_answers_carry_no_absolute_paths(tmp_path: Path, populated: tuple[Settings, list[int]]) -> None:
    """Event folder, checkpoint and store locations stay on the server: relative names or nothing."""
    settings, ids = populated
    root = settings.store.path
    ckpt = tmp_path / "models" / "efficientad-s.pt"
    # an event as the alert stage writes it: the record names the model and its checkpoint
    store = Store.from_config(StoreConfig(path=root, fsync=False), create=False)
    record = {"camera": "cam0", "seq": 7, "severity": "major", "action": "stop", "regions": [],
              "model": {"kind": "efficientad-s", "path": str(ckpt), "id": "abc"}}
    eid = store.add_event(record, camera="cam0", t_wall_ns=time.time_ns(), seq=7, severity="major", action="stop",
                          image_score=2.0, max_area_px=10)
    # a store error as the alert stage meets it (a file where a day's folder belongs): its message has a path
    day_dir = next((root / "events").iterdir())
    (root / "events" / "2099-01-01").write_text("not a folder")
    eid2 = store.add_event({"camera": "cam0"}, camera="cam0", t_wall_ns=4070908800 * 10**9, seq=8,
                           severity="major", action="log", image_score=2.0, max_area_px=10)
    import numpy as np

    assert not store.write_files(eid2, {"thumb": np.zeros((8, 8, 3), np.uint8)})
    alert_store_stats = store.stats()
    assert str(root) in alert_store_stats["last_error"]  # the leak this test is about
    store.close()
    snapshot = json.loads(json.dumps(SNAPSHOT))
    snapshot["stages"]["alert"]["store"] = alert_store_stats
    snapshot["stages"]["infer.0"]["checkpoint"] = str(ckpt)
    c = client(settings, view=StaticView(snapshot, healthy=True))

    answers = {
        "stats": c.get("/api/stats"),
        "events": c.get("/api/events"),
        "event": c.get(f"/api/events/{eid}"),
        "alarm": c.get("/api/alarm"),
        "ack": c.post("/api/alarm/ack", json={"camera": "cam0"}),
        "healthz": c.get("/healthz"),
    }
    for name, r in answers.items():
        assert r.status_code in (200, 503), (name, r.status_code)
        for leak in (str(tmp_path), str(tmp_path.resolve()), str(root)):
            assert leak not in r.text, (name, leak)
        assert not ABS_PATH.findall(r.text), (name, ABS_PATH.findall(r.text))
    ev = answers["event"].json()
    assert ev["record"]["model"]["path"] == "efficientad-s.pt"  # the checkpoint by its name
    assert ev["record"]["event_dir"].startswith("events/")  # inside the store: relative to it
    assert c.get(f"/api/events/{ids[0]}").json()["urls"]["frame"] == f"/api/events/{ids[0]}/frame"  # left alone
    assert day_dir.name in json.dumps(c.get(f"/api/events/{ids[0]}").json()["record"])
    # the store missing: the 503 tells what, not where
    missing = client(make_settings(tmp_path / "other"))
    r = missing.get("/api/events")
    assert r.status_code == 503 and "not available" in r.json()["detail"]
    assert str(tmp_path) not in r.text and not ABS_PATH.findall(r.text)


# ---------------------------------------------------------------------------------------------- time filters


def test_time_filters_are_range_checked(populated: tuple[Settings, list[int]]) -> None:
    settings, _ = populated
    c = client(settings)
    for name in ("since", "until"):
        for bad in ("99999999999", "9999-12-31", "0001-01-01", "100000000w", "1e400", "last tuesday"):
            r = c.get("/api/events", params={name: bad})
            assert r.status_code == 422, (name, bad, r.status_code, r.text)
            assert r.json()["detail"].startswith(f"{name}:"), r.text
    long = "x" * 5000
    r = c.get("/api/events", params={"since": long})
    assert r.status_code == 422 and long not in r.text
    assert c.get("/api/events", params={"since": "1000000000", "until": "2200-01-01"}).status_code == 200
    for bad in ("99999999999", "9999-12-31T00:00", "-1d", "100000000w"):
        with pytest.raises(ValueError, match="range|cannot read"):
            parse_time(bad)
    assert c.get("/api/alarm/ack").status_code == 405
    for wait in ("nan", "inf", "-1", "31"):
        assert c.post(f"/api/alarm/ack?wait={wait}", json={}).status_code == 422, wait
    assert acks(settings) == []


# ---------------------------------------------------------------------------------------------- logs


def _fails_with_a_secret_local() -> None:
    plc_password = "hunter2-SECRET-LOCAL"  # noqa: F841 - what must not reach the log
    api_token = "tok-SECRET-LOCAL-0123456789"  # noqa: F841
    raise RuntimeError("the PLC did not answer")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_logged_exceptions_carry_no_frame_locals(fmt: str) -> None:
    import logging

    import structlog

    out = io.StringIO()
    setup_logging("test", fmt=fmt, stream=out)
    try:
        _fails_with_a_secret_local()
    except RuntimeError:
        structlog.get_logger("t").exception("the action failed")
        logging.getLogger("thirdparty").exception("a library failed")  # the stdlib route (uvicorn, pymodbus)
    text = out.getvalue()
    assert "the action failed" in text and "a library failed" in text
    assert text.count("the PLC did not answer") >= 2  # the traceback itself is there ...
    assert "_fails_with_a_secret_local" in text
    assert "SECRET-LOCAL" not in text  # ... without the frames' variables
    if fmt == "json":
        for line in text.splitlines():
            rec = json.loads(line)
            for exc in rec.get("exception", []):
                assert all("locals" not in f for f in exc.get("frames", []))
