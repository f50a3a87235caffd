"""Dataset builder: discovery, scale normalisation, tile labels from masks, manifest, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from knitwatch.pipeline.offline import dataset as ds
from knitwatch.pipeline.offline.dataset import DatasetError, build_dataset, discover_images
from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams, estimate_pitch
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_fabric, render_sample
from tests.helpers.paths import AITEX, needs_aitex


def fabric(h: int, w: int, pitch: float, seed: int = 0) -> np.ndarray:
    """Knitted jersey from the project's simulator, uint8 gray."""
    return render_fabric(h, w, FabricSpec(pitch_px=pitch), seed)


def sample(h: int, w: int, pitch: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fabric image with a hole and its 0/255 mask."""
    return render_sample(h, w, FabricSpec(pitch_px=pitch), seed, defect="hole")


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def mvtec(root: Path, n_train: int = 2, n_defect: int = 2, size: tuple[int, int] = (256, 384)) -> Path:
    h, w = size
    for i in range(n_train):
        write(root / "train" / "good" / f"{i:03d}.png", fabric(h, w, 6.0, seed=i))
    write(root / "test" / "good" / "000.png", fabric(h, w, 6.0, seed=50))
    for i in range(n_defect):
        img, mask = sample(h, w, 6.0, seed=100 + i)
        write(root / "test" / "hole" / f"{i:03d}.png", img)
        write(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask)
    return root


# ---------------------------------------------------------------- discovery


def test_discover_mvtec_layout(tmp_path: Path) -> None:
    root = mvtec(tmp_path / "src")
    found = discover_images(root)
    rows = sorted((s.split, s.label, s.path.name, s.mask_path is not None) for s in found)
    assert rows == [
        ("test", "good", "000.png", False),
        ("test", "hole", "000.png", True),
        ("test", "hole", "001.png", True),
        ("train", "good", "000.png", False),
        ("train", "good", "001.png", False),
    ]


def test_discover_flat_and_folder_per_label_with_masks_beside(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    write(flat / "a.png", fabric(64, 64, 6.0))
    write(flat / "b.jpg", fabric(64, 64, 6.0))
    assert [(s.path.name, s.label, s.split) for s in discover_images(flat)] == [
        ("a.png", "good", "train"),
        ("b.jpg", "good", "train"),
    ]
    per = tmp_path / "per_label"
    write(per / "good" / "g.png", fabric(64, 64, 6.0))
    write(per / "hole" / "h.png", fabric(64, 64, 6.0))
    write(per / "hole" / "h_mask.png", np.zeros((64, 64), np.uint8))
    found = {s.path.name: s for s in discover_images(per)}
    assert set(found) == {"g.png", "h.png"}  # the mask is not an image of its own
    assert (found["g.png"].split, found["g.png"].label) == ("train", "good")
    assert (found["h.png"].split, found["h.png"].label) == ("test", "hole")
    assert found["h.png"].mask_path == per / "hole" / "h_mask.png"


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        discover_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=str(empty)):
        discover_images(empty)

    broken = tmp_path / "broken"
    write(broken / "ok.png", fabric(64, 64, 6.0))
    (broken / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"unreadable image .*bad\.png"):
        discover_images(broken)

    sizes = mvtec(tmp_path / "sizes", n_train=1, n_defect=1)
    write(sizes / "ground_truth" / "hole" / "000_mask.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(DatasetError, match=r"000_mask\.png.*size"):
        discover_images(sizes)
    with pytest.raises(DatasetError, match=r"000_mask\.png"):
        build_dataset(sizes, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- building


def test_build_labels_tiles_from_masks(tmp_path: Path) -> None:
    src = mvtec(tmp_path / "src", n_train=1, n_defect=3, size=(256, 384))
    out = tmp_path / "out"
    m = build_dataset(src, out, tile=64, stride=64, scale=1.0, min_defect_px=10, progress=False)
    assert m["preprocess"]["per_image_scale"] is False and m["preprocess"]["scale"] == 1.0
    tiles = m["tiles"]
    assert len(tiles) == (1 + 1 + 3) * (256 // 64) * (384 // 64)
    n_defect = 0
    for t in tiles:
        if t["split"] == "train":
            assert t["label"] == "good" and t["defect_px"] is None
            continue
        src_img = Path(t["source"])
        if src_img.parent.name == "good":
            assert t["label"] == "good" and t["defect_px"] is None
            continue
        mask = cv2.imread(str(src / "ground_truth" / "hole" / f"{src_img.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        truth = int(np.count_nonzero(mask[t["y"] : t["y"] + 64, t["x"] : t["x"] + 64]))
        assert t["defect_px"] == truth
        assert t["label"] == ("hole" if truth >= 10 else "good")
        tile_png = cv2.imread(str(out / t["file"]), cv2.IMREAD_GRAYSCALE)
        src_png = cv2.imread(str(src / t["source"]), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(tile_png, src_png[t["y"] : t["y"] + 64, t["x"] : t["x"] + 64])
        if t["label"] == "hole":
            n_defect += 1
            assert t["file"].startswith("test/hole/")
            mpng = cv2.imread(str(out / "ground_truth" / "hole" / (Path(t["file"]).stem + "_mask.png")), 0)
            assert np.count_nonzero(mpng) == truth
        else:
            assert t["file"].startswith("test/good/")
    assert n_defect >= 3
    assert m["counts"]["test/hole"] == n_defect
    # names: the three sources called 000.png got distinct stems; files on disk match the manifest
    assert len({t["file"] for t in tiles}) == len(tiles)
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("t*/*/*.png")}
    assert on_disk == {t["file"] for t in tiles}
    assert len(list((out / "ground_truth" / "hole").glob("*_mask.png"))) == n_defect


def test_manifest_files_and_preprocess_block(tmp_path: Path) -> None:
    src = mvtec(tmp_path / "src", n_train=2, n_defect=1)
    out = tmp_path / "out"
    m = build_dataset(src, out, tile=128, stride=96, photometric="standardize", progress=False)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["tiles"] == m["tiles"] and on_disk["preprocess"] == m["preprocess"]
    assert ds.load_manifest(out)["format"] == "knitwatch-tiles"
    pre = m["preprocess"]
    cfg = PreprocessConfig.from_dict(pre)
    assert cfg.per_image_scale and cfg.target_pitch == pytest.approx(6.0, rel=0.05)
    assert cfg.params.tile == 128 and cfg.params.stride == 96 and cfg.params.photometric == "standardize"
    params = PreprocessParams.from_dict({k: v for k, v in pre.items() if k not in ("target_pitch", "per_image_scale")})
    assert params == cfg.params
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(m["tiles"])
    assert list(rows[0]) == ["file", "source", "split", "label", "y", "x", "scale", "pitch", "defect_px"]
    assert rows[0]["file"] == m["tiles"][0]["file"]
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary folder was renamed, not left behind


def test_mixed_resolutions_give_tiles_of_one_loop_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    base = fabric(384, 576, 6.0, seed=1)
    for f in (1.0, 1.5, 0.75):  # the same fabric captured at three resolutions
        img = cv2.resize(base, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        write(src / f"f{f}.png", img)
    write(src / "p8.png", fabric(384, 576, 8.0, seed=2))  # a coarser render of the same texture
    out = tmp_path / "out"
    m = build_dataset(src, out, tile=128, stride=128, progress=False)
    target = m["preprocess"]["target_pitch"]
    scales = {Path(i["source"]).stem: i["scale"] for i in m["images"]}
    assert scales["f1.5"] == pytest.approx(scales["f1.0"] / 1.5, rel=0.05)
    assert scales["f0.75"] == pytest.approx(scales["f1.0"] / 0.75, rel=0.05)
    assert scales["p8"] == pytest.approx(scales["f1.0"] * 6 / 8, rel=0.05)
    measured = [estimate_pitch(cv2.imread(str(out / t["file"]), cv2.IMREAD_GRAYSCALE)) for t in m["tiles"]]
    assert all(p is not None for p in measured)
    for p in measured:
        assert p == pytest.approx(target, rel=0.10)


def test_blank_padding_tiles_are_skipped(tmp_path: Path) -> None:
    img = fabric(128, 512, 6.0)
    img[:, :256] = 255
    write(tmp_path / "src" / "strip.png", img)
    m = build_dataset(tmp_path / "src", tmp_path / "out", tile=128, scale=1.0, progress=False)
    assert sorted(t["x"] for t in m["tiles"]) == [256, 384]
    assert m["counts"]["skipped_blank"] == 2 and m["images"][0]["skipped_blank"] == 2


def test_no_texture_needs_an_explicit_scale(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "fabric.png", fabric(128, 256, 6.0))
    write(src / "blank.png", np.random.default_rng(0).integers(0, 256, (128, 256), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"blank\.png.*--scale"):
        build_dataset(src, tmp_path / "out", tile=64, progress=False)
    assert not (tmp_path / "out").exists()
    m = build_dataset(src, tmp_path / "out", tile=64, scale=0.5, progress=False)
    assert {t["scale"] for t in m["tiles"]} == {0.5}
    assert m["preprocess"]["target_pitch"] is None


def test_output_must_be_new_and_failures_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = mvtec(tmp_path / "src", n_train=2, n_defect=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        build_dataset(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "x"

    calls = {"n": 0}
    real = ds.preprocess

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(ds, "preprocess", failing)
    out2 = tmp_path / "out2"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_dataset(src, out2, progress=False)
    assert not out2.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


# ---------------------------------------------------------------- real fabric


@pytest.mark.data
@needs_aitex("fabric01")
def test_aitex_fabric01_subset(tmp_path: Path) -> None:
    fab = AITEX / "fabric01"
    src = tmp_path / "fabric01"
    picks = [
        *sorted((fab / "train" / "good").glob("*.png"))[:3],
        *sorted((fab / "test" / "good").glob("*.png"))[:1],
        *sorted((fab / "test" / "002_broken_end").glob("*.png"))[:1],
        *sorted((fab / "test" / "030_nep").glob("*.png"))[:1],
    ]
    for p in picks:  # symlinks into tmp_path: the images are never copied into the repository
        rel = p.relative_to(fab)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).symlink_to(p)
        mask = fab / "ground_truth" / rel.parent.name / f"{p.stem}_mask.png"
        if mask.is_file():
            (src / "ground_truth" / rel.parent.name).mkdir(parents=True, exist_ok=True)
            (src / "ground_truth" / rel.parent.name / mask.name).symlink_to(mask)
    out = tmp_path / "tiles"
    m = build_dataset(src, out, tile=256, stride=256, progress=False)
    pitches = [i["pitch"] for i in m["images"]]
    assert max(pitches) / min(pitches) < 1.05  # one fabric, one loop size
    assert 11.0 < m["preprocess"]["target_pitch"] < 15.0
    # strips that start with >= 256 px of white padding lose exactly their first tile
    padded = sum(bool((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[:, :260] == 255).all()) for p in picks)
    assert padded >= 3 and m["counts"]["skipped_blank"] == padded
    assert m["counts"]["train/good"] >= 3 * 14
    defect_tiles = [t for t in m["tiles"] if t["label"] != "good"]
    assert defect_tiles and all(t["defect_px"] >= 10 for t in defect_tiles)
    for t in defect_tiles:
        assert (out / "ground_truth" / t["label"] / (Path(t["file"]).stem + "_mask.png")).is_file()
    for t in m["tiles"][:40]:
        tile = cv2.imread(str(out / t["file"]), cv2.IMREAD_GRAYSCALE)
        assert tile.shape == (256, 256) and tile.std() >= 2.0
    assert PreprocessConfig.from_dict(m["preprocess"]).per_image_scale
    shutil.rmtree(out)
