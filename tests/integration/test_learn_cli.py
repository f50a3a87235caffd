"""``knitwatch learn record|train`` through the real command: a simulated camera recorded directly (and
through the daemon's recorder), a tiny model trained in the low-priority training process, validated,
installed into a model library; bad input refused with exit code 2 and nothing half-written."""

from __future__ import annotations

import errno
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knitwatch.models.articles import Library
from knitwatch.pipeline.recording import Recording, RecordingWriter
from tests.helpers.cli import KNITWATCH, clean_env, knitwatch
from tests.helpers.net import free_port

CONFIG = """
[[cameras]]
id = "cam0"
source = "simulator"
fps = 1.0
width = 256
height = 128
[cameras.simulator]
pitch_px = 6.0
speed_px = 32.0
revolution_frames = 12
seed = 3
[cameras.position]
source = "simulator"

[inference]
backend = "torch"
device = "cpu"

[store]
path = "{store}"

[api]
port = {port}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("learn")
    cfg = tmp / "knitwatch.toml"
    cfg.write_text(CONFIG.format(store=tmp / "store", port=free_port()))
    return {"cfg": str(cfg), "library": tmp / "store" / "models", "tmp": tmp}


def kw(setup: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return knitwatch("--config", setup["cfg"], "learn", *args, env=env, timeout=300)


def run_in_process(setup: dict, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The same command in this process (quick: for the input checks that come before any work)."""
    from knitwatch.daemon.cli.main import main

    rc = main(["--config", setup["cfg"], "learn", *args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def learned(setup: dict) -> dict:
    r = kw(setup, "record", "--camera", "cam0", "--article", "jersey-1", "--fast", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    r = kw(setup, "train", "--article", "jersey-1", "--steps", "5", "--use", "--camera", "cam0", "--json")
    assert r.returncode == 0, r.stderr
    return {"record": rec, "train": json.loads(r.stdout), "stderr": r.stderr}


def test_record_directly_from_the_camera_into_the_library(setup: dict, learned: dict) -> None:
    rec = learned["record"]
    folder = Path(rec["recording"])
    assert folder.parent == setup["library"] / "recordings" / "jersey-1"
    assert rec["how"] == "camera" and rec["status"] == "done" and rec["revolutions"] == 3
    recording = Recording(folder)
    assert len(recording) == rec["frames"] and recording.meta["camera"] == "cam0"
    assert all(f.revolution is not None for f in recording)


def test_train_validates_installs_and_selects(setup: dict, learned: dict) -> None:
    out = learned["train"]
    assert out["installed"] is True and out["model"] == "jersey-1@v1" and out["camera"] == "cam0"
    assert out["kind"] == "msflow-efficientnet-lite0" and out["device"] == "cpu"  # auto on a CPU host
    assert out["validation_frames"] == 12 and out["false_stops"] == 0 and out["false_stops_per_hour"] == 0.0
    assert 0.0 <= out["simulator_recall"] <= 1.0
    assert "separate process (nice 10, 1 thread(s))" in learned["stderr"]
    lib = Library(setup["library"])
    m = lib.get("jersey-1")
    assert m.version == 1 and m.checkpoint.is_file()
    meta = m.meta
    assert meta["kind"] == out["kind"] and meta["host"] == "cpu" and meta["recording"] == learned["record"]["recording"]
    assert meta["frames"]["validation"] == 12 and meta["frames"]["train"] > 0
    assert meta["validation"]["stops"] == 0 and meta["training"]["steps"] == 5 and meta["training"]["nice"] == 10
    assert meta["recall_on_simulator"]["defects"] >= 1
    assert lib.selection()["cameras"]["cam0"]["model"]["id"] == "jersey-1@v1"
    from knitwatch.models.checkpoint import load_checkpoint

    assert load_checkpoint(m.checkpoint).thresholds == pytest.approx(meta["thresholds"])


def test_unknown_camera_and_bad_article_names(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    r = kw(setup, "record", "--camera", "nope", "--article", "x", "--fast")  # the real command once
    assert r.returncode == 2 and "unknown camera 'nope'" in r.stderr and "cam0" in r.stderr
    for bad in ("../evil", "a/b", ".."):
        rc, err = run_in_process(setup, capsys, "record", "--camera", "cam0", "--article", bad, "--fast")
        assert rc == 2 and "no path characters" in err, err
        rc, err = run_in_process(setup, capsys, "train", "--article", bad)
        assert rc == 2 and "no path characters" in err, err
    assert not (setup["library"] / "recordings" / "x").exists()
    assert not (setup["tmp"] / "evil").exists()
    rc, err = run_in_process(setup, capsys, "train", "--article", "jersey-1", "--use")
    assert rc == 2 and "--use needs --camera" in err
    rc, err = run_in_process(setup, capsys, "train", "--article", "jersey-1", "--use", "--camera", "cam9")
    assert rc == 2 and "unknown camera 'cam9'" in err


def test_train_without_a_recording(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_in_process(setup, capsys, "train", "--article", "pique")
    assert rc == 2 and "no recording for article 'pique'" in err and "learn record" in err


def test_too_few_revolutions_is_refused_before_training(setup: dict, learned: dict,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNITWATCH_LEARN__VALIDATION_REVOLUTIONS", "3")
    rc, err = run_in_process(setup, capsys, "train", "--article", "jersey-1", "--steps", "2")
    assert rc == 2, err
    assert "covers 4 revolution(s)" in err and "needs at least 5" in err
    assert [m.version for m in Library(setup["library"]).versions("jersey-1")] == [1]


def test_frames_without_fabric_texture(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    folder = setup["library"] / "recordings" / "blank" / "20260101T000000Z"
    w = RecordingWriter(folder, article="blank", camera="cam0", how="camera", target_frames=10**6, min_revolutions=0)
    rng = np.random.default_rng(1)
    for i in range(24):
        pos = {"rev": i // 6, "offset_px": 0.0, "circumference_px": 500.0, "source": "simulator", "ok": True}
        w.add(rng.integers(90, 170, (128, 256), dtype=np.uint8), seq=i, pos=pos, t_wall_ns=i)
    w.finish("done")
    rc, err = run_in_process(setup, capsys, "train", "--article", "blank", "--steps", "2")
    assert rc == 2 and "no fabric texture in the recorded frames" in err, err
    assert Library(setup["library"]).versions("blank") == []
    assert not (setup["library"] / "blank").exists()


def test_a_model_with_too_many_false_stops_is_refused(setup: dict, learned: dict) -> None:
    env = {"KNITWATCH_ALERT__IMAGE_THRESHOLD": "1e-6", "KNITWATCH_ALERT__PIXEL_THRESHOLD": "1e-6"}
    r = kw(setup, "train", "--article", "jersey-1", "--steps", "2", "--no-recall", "--json", env=env)
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["installed"] is False and out["false_stops"] >= 1
    assert "refused, not installed" in r.stderr and "max_false_stops_per_hour = 1" in r.stderr
    assert [m.version for m in Library(setup["library"]).versions("jersey-1")] == [1]


def test_a_full_disk_while_recording_leaves_nothing(setup: dict, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from knitwatch.daemon.cli.main import main
    from knitwatch.pipeline import recording

    opened = {"frames": 0}

    class FullDisk:
        """A frame file on a disk that fills up: half the bytes are written, then ENOSPC."""

        def __init__(self, f: Any) -> None:  # noqa: ANN401
            self.f = f

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:  # noqa: ANN401
        f = open(path, mode, *a, **k)  # noqa: SIM115 - wrapped below
        if "frames" in Path(path).parts and "w" in mode:
            opened["frames"] += 1
            if opened["frames"] > 5:  # the 6th frame finds the disk full
                return FullDisk(f)
        return f

    monkeypatch.setattr(recording, "open", fake_open, raising=False)
    rc = main(["--config", setup["cfg"], "learn", "record", "--camera", "cam0", "--article", "full", "--fast",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and opened["frames"] == 6, err
    assert "cannot write frame 5" in err and "No space left on device" in err and "nothing was kept" in err
    assert not (setup["library"] / "recordings" / "full").exists() or not any(
        (setup["library"] / "recordings" / "full").iterdir())


def test_a_full_disk_while_installing_leaves_nothing(setup: dict, learned: dict,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from knitwatch.daemon.cli.main import main
    from knitwatch.models import articles

    def copyfile(src: str, dst: str) -> None:
        Path(dst).write_bytes(b"half")  # a part was written, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(articles.shutil, "copyfile", copyfile)
    rc = main(["--config", setup["cfg"], "learn", "train", "--article", "jersey-1", "--steps", "2", "--no-recall",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "nothing was installed" in err
    assert [m.version for m in Library(setup["library"]).versions("jersey-1")] == [1]
    assert not list(setup["library"].glob(".tmp-*")) and not (setup["library"] / "jersey-1" / "v2").exists()


def test_record_through_the_daemons_recorder(setup: dict) -> None:
    """``--via-daemon``: the command writes the request and follows the recording that the daemon's recorder
    (the alert stage's :class:`DaemonRecorder`, fed here with the simulated camera's frames) makes."""
    from knitwatch.config.settings import CameraConfig, PositionConfig, SimulatorConfig
    from knitwatch.pipeline.offline.learn import locate, open_camera
    from knitwatch.pipeline.recording import DaemonRecorder

    out = setup["tmp"] / "via-daemon"
    proc = subprocess.Popen([*KNITWATCH, "--config", setup["cfg"], "learn", "record", "--camera", "cam0",
                             "--article", "pique-2", "--via-daemon", "--out", str(out), "--json", "--quiet",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    cam = CameraConfig(id="cam0", source="simulator", fps=1.0, width=256, height=128,
                       simulator=SimulatorConfig(texture="pique", revolution_frames=12, speed_px=32.0),
                       position=PositionConfig(source="simulator"))
    rec = DaemonRecorder(setup["library"], ["cam0"], poll_s=0.05)
    source, position = open_camera(cam)
    stop = threading.Event()

    def daemon() -> None:
        seq = 0
        while not stop.is_set() and seq < 2000:
            rec.poll()
            img = source.read()
            rec.frame("cam0", img, seq=seq, pos=locate(position, img, source), t_wall_ns=time.time_ns(),
                      flagged=seq % 10 == 3, model_article="pique-2")  # flagged by a model of this fabric: left out
            seq += 1
            time.sleep(0.002)

    t = threading.Thread(target=daemon, daemon=True)
    t.start()
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        stop.set()
        t.join(5)
        source.close()
    assert proc.returncode == 0, stderr
    res = json.loads(stdout)
    assert res["how"] == "daemon" and res["status"] == "done" and res["revolutions"] == 3
    assert res["skipped_flagged"] >= 1
    assert Recording(out).meta["how"] == "daemon" and len(Recording(out)) == res["frames"]
    assert not (setup["library"] / "recording" / "cam0.json").exists()  # the request is gone
