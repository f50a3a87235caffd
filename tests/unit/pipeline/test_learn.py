"""Learning a fabric (pipeline/offline/learn.py): recording from a camera, the revolution split, the pitch
and texture checks, validation through the decision layer, refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knitwatch.config.settings import AlertConfig, CameraConfig, PositionConfig, SimulatorConfig
from knitwatch.pipeline.offline import learn
from knitwatch.pipeline.offline.learn import LearnError
from knitwatch.pipeline.recording import Recording, RecordingError, RecordingWriter
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_fabric

REV = 12  # frames per revolution of the small simulated camera


def sim_camera(*, position: str = "simulator", rev: int = REV, defects: list | None = None, seed: int = 3,
               width: int = 256, height: int = 128) -> CameraConfig:
    return CameraConfig(id="cam0", source="simulator", fps=1.0, width=width, height=height,
                        simulator=SimulatorConfig(pitch_px=6.0, speed_px=32.0, revolution_frames=rev, seed=seed,
                                                  defects=defects or []),
                        position=PositionConfig(source=position))  # type: ignore[arg-type]


def writer(folder: Path, min_revolutions: int = 3, target_frames: int = 0) -> RecordingWriter:
    return RecordingWriter(folder, article="jersey", camera="cam0", how="camera", target_frames=target_frames,
                           min_revolutions=min_revolutions)


def pos(rev: int, off: float = 0.0) -> dict:
    return {"rev": rev, "offset_px": off, "circumference_px": 1000.0, "source": "simulator", "ok": True,
            "cutline_px": None}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    folder = tmp_path_factory.mktemp("rec") / "r"
    meta = learn.record_from_camera(sim_camera(), writer(folder), pace=False)
    assert meta["status"] == "done"
    return Recording(folder)


@pytest.fixture(scope="module")
def tiny_model(recorded: Recording, tmp_path_factory: pytest.TempPathFactory) -> learn.TrainResult:
    return learn.train_article(recorded, tmp_path_factory.mktemp("model"), steps=5, threads=1, device="cpu",
                               progress=False)


# ---------------------------------------------------------------------------------------------- recording


def test_record_from_camera_covers_whole_revolutions_with_the_capture_stages_position(recorded: Recording) -> None:
    revs = [f.revolution for f in recorded.frames]
    assert recorded.meta["revolutions"] == 3 and recorded.meta["how"] == "camera"
    assert recorded.meta["paced"] is False and recorded.meta["fps"] == 1.0
    assert all(r is not None for r in revs) and revs == sorted(revs)
    whole = sorted(set(revs))[1:]  # the first revolution was entered in its middle (or at its start)
    assert len(whole) == 3
    for r in whole:  # every whole revolution has all its frames: the recording ended at a revolution's start
        assert revs.count(r) == REV, (r, revs.count(r))
    first = recorded.frames[0]
    assert first.pos is not None and first.pos["source"] == "simulator" and first.pos["ok"] is True
    assert first.image().shape == (128, 256)
    assert [f.seq for f in recorded.frames] == list(range(len(recorded)))


def test_record_refuses_a_camera_without_fabric_position(tmp_path: Path) -> None:
    w = writer(tmp_path / "r")
    with pytest.raises(RecordingError, match="cam0.*no fabric position"):
        learn.record_from_camera(sim_camera(position="none"), w, pace=False)


def test_record_names_a_camera_that_cannot_be_opened(tmp_path: Path) -> None:
    cam = CameraConfig(id="door", source="folder", uri=str(tmp_path / "missing"), fps=1.0,
                       position=PositionConfig(source="image"))
    w = writer(tmp_path / "r")
    with pytest.raises(RecordingError, match="camera 'door' \\(folder\\) cannot be opened"):
        learn.record_from_camera(cam, w, pace=False)


def test_record_gives_up_when_revolutions_never_come(tmp_path: Path) -> None:
    w = writer(tmp_path / "r")
    with pytest.raises(RecordingError, match="did not cover 3 whole revolutions in 30 frames"):
        learn.record_from_camera(sim_camera(rev=1000), w, pace=False, max_frames=30)
    assert Recording(tmp_path / "r").meta["status"] == "failed"


def test_record_gives_up_when_the_position_never_counts_a_revolution(tmp_path: Path) -> None:
    import cv2

    for i in range(3):  # a covered lens: blank frames; the image position keeps saying revolution 0
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((64, 128), 128, np.uint8))
    cam = CameraConfig(id="blank", source="folder", uri=str(tmp_path), fps=1.0, position=PositionConfig(source="image"))
    w = writer(tmp_path / "r")
    with pytest.raises(RecordingError, match="camera 'blank': no new revolution for 1[01] s"):
        learn.record_from_camera(cam, w, pace=False, revolution_timeout_s=10)
    assert Recording(tmp_path / "r").meta["status"] == "failed"


def test_record_paces_a_simulator_at_the_cameras_fps(tmp_path: Path) -> None:
    cam = sim_camera(rev=2).model_copy(update={"fps": 40.0})
    w = writer(tmp_path / "r", min_revolutions=2)
    meta = learn.record_from_camera(cam, w, pace=True)
    rec = Recording(tmp_path / "r")
    span = (rec.frames[-1].t_wall_ns - rec.frames[0].t_wall_ns) / 1e9
    assert meta["paced"] is True
    assert span >= (len(rec) - 1) / 40.0 * 0.9  # not faster than the camera's rate


# ---------------------------------------------------------------------------------------------- split


def test_split_holds_back_whole_revolutions_with_a_gap(recorded: Recording) -> None:
    train, val = learn.split_frames(recorded, 1)
    revs = sorted({f.revolution for f in recorded.frames})
    assert {f.revolution for f in val} == {revs[-1]}
    assert max(f.revolution for f in train) < revs[-2]  # the revolution before the held-back one is in neither
    assert not {f.index for f in train} & {f.index for f in val}
    assert len(val) == REV


def test_split_refuses_too_few_revolutions(tmp_path: Path) -> None:
    w = writer(tmp_path / "r", min_revolutions=0, target_frames=10**6)
    img = render_fabric(64, 64, FabricSpec(pitch_px=6.0), 0)
    for i in range(10):
        w.add(img, seq=i, pos=pos(i // 5), t_wall_ns=i)
    w.finish("done")
    with pytest.raises(LearnError, match="covers 2 revolution\\(s\\).*needs at least 3"):
        learn.split_frames(Recording(tmp_path / "r"), 1)
    with pytest.raises(LearnError, match="needs at least 4"):
        learn.split_frames(Recording(tmp_path / "r"), 2)


def test_thin_spreads_frames_evenly(recorded: Recording) -> None:
    got = learn.thin(recorded.frames, 5)
    assert len(got) == 5 and got[0] is recorded.frames[0] and got[-1] is recorded.frames[-1]
    assert learn.thin(recorded.frames[:3], 5) == recorded.frames[:3]


# ---------------------------------------------------------------------------------------------- pitch, texture


def test_pitch_is_measured_on_the_recorded_fabric(recorded: Recording) -> None:
    train, _ = learn.split_frames(recorded, 1)
    config, pitch = learn.preprocess_config(train, tile=64, roi=None, scale=None, where="rec")
    assert pitch is not None and abs(pitch - 6.0) < 0.3
    assert config.target_pitch == pitch and config.params.tile == 64


def noise_recording(folder: Path) -> Recording:
    w = writer(folder, min_revolutions=0, target_frames=10**6)
    rng = np.random.default_rng(0)
    for i in range(20):
        w.add(rng.integers(0, 256, (128, 256), dtype=np.uint8), seq=i, pos=pos(i // 5), t_wall_ns=i)
    w.finish("done")
    return Recording(folder)


def test_frames_without_fabric_texture_are_refused_unless_a_scale_is_given(tmp_path: Path) -> None:
    rec = noise_recording(tmp_path / "r")
    train, _ = learn.split_frames(rec, 1)
    with pytest.raises(LearnError, match="no fabric texture in the recorded frames"):
        learn.preprocess_config(train, tile=64, roi=None, scale=None, where=str(rec.folder))
    config, _ = learn.preprocess_config(train, tile=64, roi=None, scale=1.0, where=str(rec.folder))
    assert config.target_pitch is None and config.params.scale == 1.0
    with pytest.raises(LearnError, match="no fabric texture"):
        learn.train_article(rec, tmp_path / "m", steps=1, device="cpu", progress=False)
    assert not (tmp_path / "m" / "model.ckpt").exists()


def test_tiles_are_cut_by_the_one_preprocessing_path(recorded: Recording) -> None:
    train, _ = learn.split_frames(recorded, 1)
    config, _ = learn.preprocess_config(train, tile=64, roi=None, scale=None, where="rec")
    tiles = learn.frame_tiles(train[:2], config, None)
    assert tiles.shape[1:] == (64, 64) and tiles.dtype == np.uint8
    assert len(tiles) == 2 * (128 // 64) * (256 // 64)  # the pitch is ~6 px: scale ~1, 8 tiles per frame
    roi_tiles = learn.frame_tiles(train[:2], config, (0, 0, 128, 128))
    assert len(roi_tiles) == 2 * 4


# ---------------------------------------------------------------------------------------------- model choice


def test_the_host_decides_the_default_model() -> None:
    assert learn.default_model("cpu") == "msflow-efficientnet-lite0"
    assert learn.default_model("cuda") == "efficientad-s"
    assert learn.resolve_kind("auto", "cpu") == "msflow-efficientnet-lite0"
    assert learn.default_steps("msflow-efficientnet-lite0") == learn.DEFAULT_STEPS["msflow"]
    with pytest.raises(LearnError, match="cannot be trained"):
        learn.resolve_kind("patchcore", "cpu")


# ---------------------------------------------------------------------------------------------- train + validate


def test_train_article_writes_a_calibrated_checkpoint(tiny_model: learn.TrainResult, recorded: Recording) -> None:
    from knitwatch.models.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_model.checkpoint)
    assert ck.kind == tiny_model.kind == "msflow-efficientnet-lite0"
    assert ck.preprocess == tiny_model.preprocess and ck.preprocess["target_pitch"] == tiny_model.pitch
    assert set(ck.thresholds) == {"image", "pixel"} and ck.thresholds == pytest.approx(tiny_model.thresholds)
    assert ck.provenance["article"] == "jersey" and ck.provenance["train_frames"] == tiny_model.train_frames
    train, val = learn.split_frames(recorded, 1)
    assert tiny_model.train_frames == len(train) and tiny_model.validation_frames == len(val)
    assert tiny_model.steps == 5


def test_validate_counts_frames_hours_and_no_stops_on_normal_fabric(tiny_model: learn.TrainResult,
                                                                    recorded: Recording) -> None:
    _, val = learn.split_frames(recorded, 1)
    fig = learn.validate(tiny_model.checkpoint, val, AlertConfig(), fps_hint=1.0, paced=False, device="cpu",
                         backend="torch")
    assert fig["frames"] == len(val) == REV
    assert fig["hours"] == pytest.approx(REV / 3600.0, abs=1e-5) and fig["hours_from"] == "frames / fps"
    assert fig["positions"]["ok"] == REV
    assert fig["false_stops_per_hour"] == pytest.approx(fig["stops"] / fig["hours"], rel=1e-2)
    assert fig["false_stops_per_hour_upper95"] >= fig["false_stops_per_hour"]
    assert fig["image_threshold"] == pytest.approx(tiny_model.thresholds["image"], rel=1e-4)
    assert fig["max_image_score"] > 0


def test_validate_counts_stops_when_the_thresholds_are_below_the_fabric(tiny_model: learn.TrainResult,
                                                                        recorded: Recording) -> None:
    _, val = learn.split_frames(recorded, 1)
    low = AlertConfig(image_threshold=1e-6, pixel_threshold=1e-6)  # every frame one big region: stop classes
    fig = learn.validate(tiny_model.checkpoint, val, low, fps_hint=1.0, paced=False, device="cpu", backend="torch")
    assert fig["stops"] >= 1 and fig["events"] >= fig["stops"]
    assert fig["false_stops_per_hour"] == pytest.approx(fig["stops"] / fig["hours"], rel=1e-2)
    assert learn.refusal(fig, 1.0) is not None and "exceeds [learn] max_false_stops_per_hour" in learn.refusal(fig, 1.0)
    assert learn.refusal(fig, fig["false_stops_per_hour"] + 1) is None


def test_validate_takes_hours_from_the_wall_clock_of_a_paced_recording(tiny_model: learn.TrainResult,
                                                                       recorded: Recording) -> None:
    from knitwatch.pipeline.recording import RecordedFrame

    _, val = learn.split_frames(recorded, 1)
    spaced = [RecordedFrame(f.index, f.path, f.seq, i * 2_000_000_000, f.pos) for i, f in enumerate(val)]  # 0.5 fps
    fig = learn.validate(tiny_model.checkpoint, spaced, AlertConfig(), fps_hint=0.5, paced=True, device="cpu",
                         backend="torch")
    assert fig["hours_from"] == "wall clock"
    assert fig["hours"] == pytest.approx(len(val) * 2.0 / 3600.0, abs=1e-5)


def test_poisson_upper_bound() -> None:
    assert learn._poisson_upper95(0) == pytest.approx(2.996, abs=1e-3)
    assert learn._poisson_upper95(1) == pytest.approx(4.744, abs=1e-3)


def test_recall_on_simulator_needs_a_simulator_camera(tiny_model: learn.TrainResult, tmp_path: Path) -> None:
    cam = CameraConfig(id="c1", source="folder", uri=str(tmp_path), fps=1.0)
    with pytest.raises(LearnError, match="simulator camera"):
        learn.recall_on_simulator(tiny_model.checkpoint, cam, AlertConfig())


def test_recall_on_simulator_counts_the_scheduled_defects(tiny_model: learn.TrainResult) -> None:
    cam = sim_camera()
    r = learn.recall_on_simulator(tiny_model.checkpoint, cam, AlertConfig(), frames=60, device="cpu", backend="torch")
    assert r["frames"] == 60 and r["defects"] == 2  # frames 10 and 30 fit into 60 frames (one every 20)
    assert set(r["per_kind"]) == {"hole", "ladder"}
    assert r["recall"] == pytest.approx(r["found"] / r["defects"])
    low = AlertConfig(image_threshold=1e-6, pixel_threshold=1e-6)  # everything confirmed: every defect is found
    r = learn.recall_on_simulator(tiny_model.checkpoint, cam, low, frames=60, device="cpu", backend="torch")
    assert r["recall"] == 1.0 and r["stop_recall"] == 1.0
