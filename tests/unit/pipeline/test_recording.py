"""Recordings: whole revolutions, held-back revolutions that do not touch the training ones, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knitwatch.pipeline.modelswitch import ModelSelection
from knitwatch.pipeline.recording import Recording, RecordingError, RecordingWriter

REV = 5


def pos(i: int, start: int = 2) -> dict:
    """Frame i of a stream that starts in the middle of revolution 0 (frame ``start`` of it)."""
    k = i + start
    return {"rev": k // REV, "offset_px": float(k % REV) * 10, "circumference_px": 50.0, "source": "sim", "ok": True}


def record(tmp_path: Path, **kw: object) -> tuple[RecordingWriter, int]:
    w = RecordingWriter(tmp_path / "rec", article="pique", camera="cam0", how="camera", **kw)  # type: ignore[arg-type]
    frame = np.full((8, 16), 7, np.uint8)
    for i in range(200):
        if w.add(frame + i % 3, seq=i, pos=pos(i), t_wall_ns=i * 10**9):
            return w, i
    raise AssertionError("never complete")


def test_recording_ends_after_whole_revolutions(tmp_path: Path) -> None:
    w, ended_at = record(tmp_path, target_frames=4, min_revolutions=3)
    assert w.meta["status"] == "done" and w.revolutions == 3
    rec = Recording(tmp_path / "rec")
    revs = [f.revolution for f in rec]
    assert revs == [0] * 3 + [1] * REV + [2] * REV + [3] * REV  # the first revolution entered in its middle
    assert ended_at == len(rec)  # the first frame of revolution 4 is not recorded
    assert rec.frames[4].image().dtype == np.uint8 and int(rec.frames[4].image()[0, 0]) == 7 + 4 % 3  # lossless


def test_frames_target_can_extend_past_the_revolutions(tmp_path: Path) -> None:
    w, _ = record(tmp_path, target_frames=14, min_revolutions=1)
    assert w.frames >= 14 and w.revolutions == 3  # ends at the first revolution boundary after 14 frames


def test_validation_revolutions_are_not_neighbours_of_training_frames(tmp_path: Path) -> None:
    record(tmp_path, target_frames=1, min_revolutions=4)
    train, val = Recording(tmp_path / "rec").split_revolutions(1)
    assert {f.revolution for f in val} == {4}
    assert {f.revolution for f in train} == {0, 1, 2}  # revolution 3 is the gap


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "rec" / "frames").mkdir(parents=True)
    with pytest.raises(RecordingError, match="cannot create the recording"):
        RecordingWriter(tmp_path / "rec", article="pique", camera="cam0", how="camera")


def test_a_frame_that_cannot_be_written_fails_the_recording(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "rec", article="pique", camera="cam0", how="camera")
    with pytest.raises(RecordingError, match="cannot write frame 0"):
        w.add(np.zeros((0, 0), np.uint8), seq=0, pos=None, t_wall_ns=0)  # the encoder refuses an empty image
    meta = json.loads((tmp_path / "rec" / "meta.json").read_text())
    assert meta["status"] == "failed" and "frame 0" in meta["error"]


def test_model_selection_follows_the_file_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "active.json"
    default = {"id": "ckpt", "path": "a.ckpt", "preprocess": {}, "thresholds": {"image": 1.0}}
    sel = ModelSelection(path, default, poll_s=0.0)
    assert sel.model_for("cam0")["id"] == "ckpt"
    other = {"id": "pique@v1", "path": "b.ckpt", "preprocess": {"tile": 48}, "thresholds": {"image": 2.0}}
    path.write_text(json.dumps({"cameras": {"cam0": {"model": other, "history": []}}}))
    assert sel.poll() and sel.model_for("cam0")["id"] == "pique@v1" and sel.model_for("cam1")["id"] == "ckpt"
    assert set(sel.wanted()) == {"ckpt", "pique@v1"}
    path.write_text("{broken")
    assert not sel.poll() and sel.errors == 1 and sel.model_for("cam0")["id"] == "pique@v1"
    path.unlink()
    assert sel.poll() and sel.model_for("cam0")["id"] == "ckpt"


def test_a_full_disk_fails_the_recording_by_name(tmp_path: Path) -> None:
    from tests.helpers.fulldisk import tiny_disk

    with tiny_disk(tmp_path / "disk", size_kb=64) as disk:
        w = RecordingWriter(disk / "rec", article="pique", camera="cam0", how="camera")
        noise = np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)  # ~16 kB as PNG
        with pytest.raises(RecordingError, match="No space left on device"):
            for i in range(20):
                w.add(noise, seq=i, pos=None, t_wall_ns=i)
        assert w.meta["status"] == "failed"
        assert len(list((disk / "rec" / "frames").iterdir())) == w.frames  # no partial frame file left
