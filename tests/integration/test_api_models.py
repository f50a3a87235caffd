"""``/api/models`` and ``/api/learn`` with the real app (FastAPI's TestClient), a real model library holding
real checkpoints, and learn jobs that run real subprocesses.

The job runner's state machine is tested with a small real program standing in for ``knitwatch learn``
(it takes the same arguments, records real frames with the RecordingWriter, installs with Library.add,
refuses with exit code 3 or fails with exit code 2 as the real commands do); one slow test runs the real
``knitwatch learn record --direct`` + ``learn train`` on a simulator camera through the API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, LearnConfig, ModelConfig, StoreConfig
from knitwatch.daemon.api.app import create_app
from knitwatch.daemon.api.deps import StaticView
from knitwatch.daemon.api.learnjobs import LearnJobs
from knitwatch.models.articles import Library
from tests.helpers.api import SNAPSHOT, TOKEN
from tests.helpers.library import a_checkpoint, fake_learn_command, populate_library


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return a_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def fake_learn(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> list[str]:
    return fake_learn_command(tmp_path_factory.mktemp("fake-learn"), ckpt)


def settings_for(tmp: Path, ckpt: Path) -> Settings:
    return Settings(cameras=[CameraConfig(id="cam0"), CameraConfig(id="cam1")], store=StoreConfig(path=tmp / "store"),
                    model=ModelConfig(checkpoint=ckpt), learn=LearnConfig(library_dir=tmp / "lib"))


@pytest.fixture
def api(tmp_path: Path, ckpt: Path, fake_learn: list[str]) -> Iterator[tuple[TestClient, Settings]]:
    settings = settings_for(tmp_path, ckpt)
    app = create_app(settings, StaticView(SNAPSHOT, healthy=True))
    app.state.learn = LearnJobs(tmp_path / "lib", settings, command=fake_learn, poll_s=0.05,
                                grace_s=2.0)
    yield TestClient(app, base_url="http://127.0.0.1:8080"), settings
    app.state.learn.close()


def wait_job(c: TestClient, camera: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll GET /api/learn until the camera's job ended: (its last state, every distinct answer seen)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["camera"]: j for j in c.get("/api/learn").json()["jobs"]}
        job = jobs[camera]
        if not seen or job != seen[-1]:
            seen.append(job)
        if not job["running"]:
            return job, seen
        time.sleep(0.05)
    raise AssertionError(f"learn job of {camera} did not end within {timeout} s: {seen[-1:]}")


def test_models_list_use_rollback(api: tuple[TestClient, Settings], ckpt: Path) -> None:
    c, settings = api
    populate_library(settings.learn.library_dir, ckpt, [("jersey", 0.0, 0.95), ("pique", 0.5, 0.9)])
    body = c.get("/api/models").json()
    assert body["cameras"]["cam0"]["configured"] and body["cameras"]["cam0"]["checkpoint"] == ckpt.name
    assert [(v["id"], v["false_stops_per_hour"], v["recall"]) for a in body["articles"] for v in a["versions"]] == [
        ("jersey@v1", 0.0, 0.95), ("pique@v1", 0.5, 0.9)]
    assert "/" not in json.dumps(body).replace("\\/", "")  # no paths in the answer

    r = c.post("/api/models/use", json={"camera": "cam0", "model": "pique", "by": "maria"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "pique@v1" and "by itself" in r.json()["note"]
    sel = Library(settings.learn.library_dir).selection()["cameras"]["cam0"]
    assert sel["model"]["id"] == "pique@v1" and sel["by"] == "maria"
    assert c.post("/api/models/use", json={"camera": "cam0", "model": "jersey@1"}).status_code == 200
    body = c.get("/api/models").json()
    assert body["cameras"]["cam0"]["model"] == "jersey@v1" and body["cameras"]["cam0"]["history"] == ["pique@v1"]
    assert body["articles"][0]["versions"][0]["used_by"] == ["cam0"]

    r = c.post("/api/models/rollback", json={"camera": "cam0"})
    assert r.status_code == 200 and r.json()["model"] == "pique@v1"
    r = c.post("/api/models/rollback", json={"camera": "cam0"})
    assert r.status_code == 200 and r.json()["configured"] is True
    r = c.post("/api/models/rollback", json={"camera": "cam0"})
    assert r.status_code == 409 and "no earlier model" in r.json()["detail"]
    assert c.get("/api/models").json()["cameras"]["cam0"]["configured"]


def test_models_shows_the_model_the_daemon_runs_and_a_switch_under_way(tmp_path: Path, ckpt: Path) -> None:
    settings = settings_for(tmp_path, ckpt)
    populate_library(settings.learn.library_dir, ckpt, [("jersey", 0.0, 0.95), ("pique", 0.5, 0.9)])
    Library(settings.learn.library_dir).use("cam0", "pique")
    snapshot = {**SNAPSHOT, "cameras": {"cam0": {**SNAPSHOT["cameras"]["cam0"], "model": "jersey@v1"},
                                        "cam1": {**SNAPSHOT["cameras"]["cam1"], "model": "simulator-jersey"}}}
    view = StaticView(snapshot, healthy=True)
    c = TestClient(create_app(settings, view), base_url="http://127.0.0.1:8080")
    cams = c.get("/api/models").json()["cameras"]
    got = {cam: (c["model"], c["running"], c["switching"]) for cam, c in cams.items()}
    assert got == {"cam0": ("pique@v1", "jersey@v1", True), "cam1": (None, "simulator-jersey", False)}
    snapshot["cameras"]["cam0"]["model"] = "pique@v1"  # the tiler changed over
    assert c.get("/api/models").json()["cameras"]["cam0"]["switching"] is False


def test_models_bad_input_never_echoed(api: tuple[TestClient, Settings], ckpt: Path) -> None:
    c, settings = api
    populate_library(settings.learn.library_dir, ckpt, [("pique", 0.5, 0.9)])
    sel = settings.learn.library_dir / "active.json"
    cases = [
        ({"camera": "<script>cam9", "model": "pique"}, 404, "cameras: cam0, cam1"),
        ({"camera": "cam0", "model": "../../etc/passwd"}, 400, "not ARTICLE or ARTICLE@VERSION"),
        ({"camera": "cam0", "model": "pique@7"}, 400, "has no version 7"),
        ({"camera": "cam0", "model": "satin"}, 400, "no model for article 'satin'"),
        ({"camera": "cam0"}, 422, "model"),
    ]
    for payload, status, text in cases:
        r = c.post("/api/models/use", json=payload)
        assert r.status_code == status, (payload, r.text)
        assert text in r.json()["detail"]
        assert "<script>" not in r.text and "etc/passwd" not in r.text
    assert not sel.exists()  # nothing was selected
    for payload, status in [({"camera": "cam9", "article": "x", "frames": 10}, 404),
                            ({"camera": "cam0", "article": "../x", "frames": 10}, 400),
                            ({"camera": "cam0", "article": "x", "frames": 10, "minutes": 2}, 422),
                            ({"camera": "cam0", "article": "x", "frames": 0}, 422),
                            ({"camera": "cam0", "article": "x", "model": "resnet-9000"}, 400)]:
        r = c.post("/api/learn", json=payload)
        assert r.status_code == status, (payload, r.text)
        assert "../x" not in r.text and "resnet-9000" not in r.text
    assert c.get("/api/learn").json() == {"jobs": []}
    assert not (settings.learn.library_dir / "jobs").exists()
    assert c.delete("/api/learn/cam0").status_code == 404


def test_writes_need_the_token_and_the_same_origin(tmp_path: Path, ckpt: Path) -> None:
    settings = settings_for(tmp_path, ckpt)
    populate_library(settings.learn.library_dir, ckpt, [("pique", 0.5, 0.9)])
    c = TestClient(create_app(settings, StaticView(SNAPSHOT, healthy=True), token=TOKEN),
                   base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"camera": "cam0", "model": "pique"}
    assert c.get("/api/models").status_code == 401
    assert c.post("/api/models/use", json=body).status_code == 401
    assert c.post("/api/learn", json={"camera": "cam0", "article": "x"}).status_code == 401
    assert c.delete("/api/learn/cam0").status_code == 401
    for headers in ({"Origin": "null"}, {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        assert c.post("/api/models/use", json=body, headers={**auth, **headers}).status_code == 403
        assert c.post("/api/models/rollback", json={"camera": "cam0"}, headers={**auth, **headers}).status_code == 403
        assert c.post("/api/learn", json={"camera": "cam0", "article": "x", "frames": 5},
                      headers={**auth, **headers}).status_code == 403
        assert c.delete("/api/learn/cam0", headers={**auth, **headers}).status_code == 403
    assert not (settings.learn.library_dir / "jobs").exists()  # no job started
    assert not (settings.learn.library_dir / "active.json").exists()
    r = c.post("/api/models/use", json=body, headers={**auth, "Origin": "http://127.0.0.1:8080"})
    assert r.status_code == 200, r.text


def test_learn_job_records_trains_and_installs(api: tuple[TestClient, Settings]) -> None:
    c, settings = api
    r = c.post("/api/learn", json={"camera": "cam0", "article": "pique", "frames": 8, "use": True, "by": "maria"})
    assert r.status_code == 202, r.text
    assert r.json()["running"] and r.json()["article"] == "pique"
    again = c.post("/api/learn", json={"camera": "cam0", "article": "other", "frames": 8})
    assert again.status_code == 409 and "already" in again.json()["detail"]
    job, seen = wait_job(c, "cam0")
    assert job["state"] == "done", job
    assert job["model"] == "pique@v1" and job["progress"] == 1.0
    assert job["recording"]["status"] == "done" and job["recording"]["frames"] == 12  # 3 revolutions of 4 frames
    states = [s["state"] for s in seen]
    assert states.index("recording") < states.index("training") < states.index("validating") < states.index("done")
    assert any(s["state"] == "recording" and s["recording"].get("frames", 0) > 0 for s in seen)  # progress shown
    assert any(s["state"] == "training" and s["progress"] is not None and 0 < s["progress"] < 1 for s in seen)
    lib = Library(settings.learn.library_dir)
    assert [m.id for m in lib.versions("pique")] == ["pique@v1"]
    assert lib.selection()["cameras"]["cam0"]["model"]["id"] == "pique@v1"  # use: true
    assert c.get("/api/models").json()["cameras"]["cam0"]["model"] == "pique@v1"
    # a second job on the camera once the first ended; the other camera learns at the same time
    assert c.post("/api/learn", json={"camera": "cam0", "article": "pique", "frames": 4}).status_code == 202
    assert c.post("/api/learn", json={"camera": "cam1", "article": "jersey", "frames": 4}).status_code == 202
    assert wait_job(c, "cam0")[0]["model"] == "pique@v2"
    assert wait_job(c, "cam1")[0]["model"] == "jersey@v1"


def test_learn_job_refused_and_failed(api: tuple[TestClient, Settings]) -> None:
    c, settings = api
    assert c.post("/api/learn", json={"camera": "cam0", "article": "refuse-me", "frames": 4}).status_code == 202
    assert c.post("/api/learn", json={"camera": "cam1", "article": "broken", "frames": 4}).status_code == 202
    refused, _ = wait_job(c, "cam0")
    assert refused["state"] == "refused" and "false stops per hour exceed" in refused["reason"]
    assert refused["model"] is None
    failed, _ = wait_job(c, "cam1")
    assert failed["state"] == "failed" and failed["error"] == "no fabric texture in the recorded frames"
    assert Library(settings.learn.library_dir).articles() == []  # nothing installed


def test_learn_job_cancel(api: tuple[TestClient, Settings]) -> None:
    c, settings = api
    assert c.post("/api/learn", json={"camera": "cam0", "article": "slow", "minutes": 60}).status_code == 202
    deadline = time.monotonic() + 30
    while c.get("/api/learn").json()["jobs"][0]["recording"].get("frames", 0) < 1:
        assert time.monotonic() < deadline, "the recording did not start"
        time.sleep(0.1)
    job = c.app.state.learn.get("cam0")  # type: ignore[attr-defined]
    proc = job._proc
    r = c.delete("/api/learn/cam0")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and not r.json()["running"]
    assert proc.poll() is not None  # the command ended (it got Ctrl-C)
    assert r.json()["recording"]["status"] == "cancelled"
    assert c.delete("/api/learn/cam0").status_code == 404
    assert Library(settings.learn.library_dir).articles() == []


@pytest.mark.slow
def test_learn_with_the_real_commands(tmp_path: Path, ckpt: Path) -> None:
    """The real ``knitwatch learn record --direct`` (a small simulator camera) and ``learn train`` (few steps)."""
    from knitwatch.config.settings import PositionConfig, SimulatorConfig

    settings = settings_for(tmp_path, ckpt)
    settings.cameras = [CameraConfig(id="cam0", width=256, height=128, fps=10.0,
                                     simulator=SimulatorConfig(revolution_frames=12),
                                     position=PositionConfig(source="simulator"))]
    settings.learn.max_false_stops_per_hour = 1e6
    app = create_app(settings, StaticView(SNAPSHOT, healthy=True))
    app.state.learn = LearnJobs(tmp_path / "lib", settings, via="direct", poll_s=0.2)
    c = TestClient(app, base_url="http://127.0.0.1:8080")
    try:
        r = c.post("/api/learn", json={"camera": "cam0", "article": "pique", "frames": 36,
                                       "model": "msflow-efficientnet-lite0", "steps": 20, "use": True})
        assert r.status_code == 202, r.text
        job, seen = wait_job(c, "cam0", timeout=1200)
        assert job["state"] == "done", job
        assert {"recording", "training", "validating"} <= {s["state"] for s in seen}
        assert job["recording"]["status"] == "done" and job["recording"]["revolutions"] >= 3
        assert Library(tmp_path / "lib").selection()["cameras"]["cam0"]["model"]["id"] == job["model"]
        version = c.get("/api/models").json()["articles"][0]["versions"][0]
        assert version["id"] == job["model"] and version["used_by"] == ["cam0"]
        assert version["false_stops_per_hour"] is not None and version["recall"] is not None  # from its meta.json
    finally:
        app.state.learn.close()
