"""The one preprocessing path: pitch estimation, tiling, stitching, mask tiling, parameters."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from knitwatch.pipeline.preprocess import (
    PreprocessConfig,
    Preprocessor,
    PreprocessParams,
    TileGrid,
    estimate_pitch,
    measure_pitch,
    preprocess,
    stitch,
    tile_mask,
    tile_positions,
)
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_fabric


def fabric(h: int, w: int, pitch: float, seed: int = 0, **spec: object) -> np.ndarray:
    """Knitted fabric from the project's simulator: wale spacing ``pitch`` px, uint8 gray."""
    return render_fabric(h, w, FabricSpec(pitch_px=pitch, **spec), seed)


def resize(img: np.ndarray, f: float) -> np.ndarray:
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, None, fx=f, fy=f, interpolation=interp)


# ---------------------------------------------------------------- pitch


@pytest.mark.parametrize("pitch", [4.0, 6.0, 8.0, 10.0])
def test_pitch_recovered_within_5_percent(pitch: float) -> None:
    img = fabric(256, 512, pitch, seed=int(pitch))
    est = estimate_pitch(img)
    assert est is not None
    assert est == pytest.approx(pitch, rel=0.05)


@pytest.mark.parametrize(
    "spec",
    [
        {"noise_sigma": 15.0},
        {"blur_sigma": 2.0},
        {"irregularity": 0.3},
        {"brightness": 40.0, "contrast": 0.5},
        {"course_ratio": 1.5},
        {"color": True},
    ],
)
def test_pitch_under_hard_conditions(spec: dict) -> None:
    est = estimate_pitch(fabric(256, 512, 6.0, seed=11, **spec))
    assert est == pytest.approx(6.0, rel=0.05)


def test_pitch_of_pique_is_its_two_wale_repeat() -> None:
    # the honeycomb repeats every two wales: the estimate is that repeat, for every pitch alike
    for pitch in (4.0, 7.0):
        assert estimate_pitch(fabric(256, 512, pitch, seed=2, texture="pique")) == pytest.approx(2 * pitch, rel=0.03)


@pytest.mark.parametrize("factor", [1.5, 0.6])
def test_pitch_follows_a_resize(factor: float) -> None:
    img = fabric(384, 512, 8.0, seed=3)
    p0 = estimate_pitch(img)
    p1 = estimate_pitch(resize(img, factor))
    assert p0 is not None and p1 is not None
    assert p1 == pytest.approx(p0 * factor, rel=0.05)
    assert p1 == pytest.approx(8.0 * factor, rel=0.05)


def test_pitch_none_without_periodic_texture() -> None:
    rng = np.random.default_rng(1)
    assert estimate_pitch(np.full((256, 256), 200, np.uint8)) is None
    assert estimate_pitch(rng.integers(0, 256, (256, 512), dtype=np.uint8)) is None
    smooth = cv2.GaussianBlur(rng.normal(128, 40, (256, 512)), (0, 0), 3)
    assert estimate_pitch(np.clip(smooth, 0, 255).astype(np.uint8)) is None
    ramp = np.tile(np.linspace(0, 255, 512), (256, 1)).astype(np.uint8)
    assert estimate_pitch(ramp) is None


def test_pitch_ignores_flat_padding_and_colour() -> None:
    img = fabric(256, 768, 6.0, seed=5)
    padded = img.copy()
    padded[:, :300] = 255  # line-scan strips that begin with white padding (as in AITEX)
    assert estimate_pitch(padded) == pytest.approx(estimate_pitch(img), rel=0.02)
    bgr = np.repeat(img[:, :, None], 3, axis=2)
    assert estimate_pitch(bgr) == pytest.approx(estimate_pitch(img), rel=1e-6)


def test_pitch_falls_back_to_the_vertical_period() -> None:
    y = np.arange(256)[:, None]
    stripes = (128 + 60 * np.sin(2 * np.pi * y / 7.0) + np.zeros((1, 512))).astype(np.uint8)
    est = measure_pitch(stripes)
    assert est is not None and est.axis == "y"
    assert est.pitch == pytest.approx(7.0, rel=0.03)
    assert measure_pitch(stripes, vertical_fallback=False) is None


# ---------------------------------------------------------------- tiling and stitching


def test_tile_positions_cover_and_align_the_last_tile() -> None:
    assert tile_positions(256, 256, 256) == [0]
    assert tile_positions(100, 256, 256) == [0]
    assert tile_positions(600, 256, 256) == [0, 256, 344]
    assert tile_positions(600, 256, 128) == [0, 128, 256, 344]
    assert tile_positions(512, 256, 256) == [0, 256]


@pytest.mark.parametrize(
    ("shape", "stride"),
    [((256, 256), 256), ((300, 517), 256), ((700, 300), 256), ((600, 600), 128), ((333, 999), 100), ((100, 150), 256)],
)
def test_tile_stitch_round_trip_is_exact(shape: tuple[int, int], stride: int) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    params = PreprocessParams(tile=256, stride=stride)
    tiles, grid = preprocess(img, params)
    assert tiles.dtype == np.uint8 and tiles.flags.c_contiguous
    assert tiles.shape == (len(grid), 256, 256)
    assert grid.scaled_shape == shape and grid.frame_shape == shape
    back = stitch(tiles.astype(np.float32), grid)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, img.astype(np.float32))
    # every tile is exactly the image at its coordinates (where the image exists)
    for t, (y, x) in zip(tiles, grid.coords, strict=True):
        crop = img[y : y + 256, x : x + 256]
        np.testing.assert_array_equal(t[: crop.shape[0], : crop.shape[1]], crop)


def test_small_image_is_reflect_padded_and_cropped_back() -> None:
    img = np.arange(60 * 90, dtype=np.int64).reshape(60, 90) % 251
    img = img.astype(np.uint8)
    tiles, grid = preprocess(img, PreprocessParams(tile=128, stride=128))
    assert tiles.shape == (1, 128, 128)
    assert grid.scaled_shape == (60, 90) and grid.padded_shape == (128, 128)
    np.testing.assert_array_equal(tiles[0, 60:62, :90], img[[58, 57], :])  # reflection, edge not repeated
    np.testing.assert_array_equal(stitch(tiles.astype(np.float32), grid), img.astype(np.float32))


def test_colour_frames() -> None:
    rng = np.random.default_rng(2)
    bgr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tiles, grid = preprocess(bgr, PreprocessParams(tile=128, stride=128, grayscale=False))
    assert tiles.shape == (len(grid), 128, 128, 3)
    np.testing.assert_array_equal(tiles[0], bgr[:128, :128])
    gray_tiles, _ = preprocess(bgr, PreprocessParams(tile=128, stride=128))
    np.testing.assert_array_equal(gray_tiles[0], cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[:128, :128])
    # a gray frame with grayscale=False still gives 3-channel tiles (one shape per parameter set)
    t3, _ = preprocess(bgr[:, :, 0], PreprocessParams(tile=128, stride=128, grayscale=False))
    assert t3.shape[-1] == 3


@pytest.mark.parametrize("scale", [0.5, 0.73, 1.6])
def test_scaled_stitch_returns_frame_shape_and_keeps_constants(scale: float) -> None:
    img = fabric(300, 520, 8.0)
    tiles, grid = preprocess(img, PreprocessParams(scale=scale, tile=128, stride=96))
    assert grid.scaled_shape == (round(300 * scale), round(520 * scale))
    maps = np.full((len(grid), 32, 32), 3.25, np.float32)  # coarser than the tile, like a model's map
    out = stitch(maps, grid)
    assert out.shape == (300, 520)
    np.testing.assert_allclose(out, 3.25, rtol=1e-5)
    # a smooth image's tiles, stitched, come back to the original pixels (no shift, no seams)
    rng = np.random.default_rng(5)
    smooth = cv2.GaussianBlur(rng.normal(0, 1, (300, 520)), (0, 0), 12)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    tiles, grid = preprocess(smooth, PreprocessParams(scale=scale, tile=128, stride=96))
    err = np.abs(stitch(tiles.astype(np.float32), grid) - smooth.astype(np.float32))
    assert err.mean() < 0.6 and np.percentile(err, 99) < 2.0  # a 1-px shift would give ~1.7


def test_scale_near_one_does_not_add_a_duplicate_row_of_tiles() -> None:
    img = fabric(256, 1024, 6.0)
    tiles, grid = preprocess(img, PreprocessParams(scale=1.004, tile=256, stride=256))
    assert grid.scaled_shape == (256, 1024) and len(grid) == 4  # 257 x 1028 snapped onto the grid
    assert stitch(tiles.astype(np.float32), grid).shape == (256, 1024)
    _, g2 = preprocess(img, PreprocessParams(scale=1.05, tile=256, stride=256))
    assert g2.scaled_shape == (269, 1075) and len(g2) == 2 * 5  # a real overshoot keeps its edge tiles
    _, g3 = preprocess(fabric(257, 1024, 6.0), PreprocessParams(scale=1.0, tile=256, stride=256))
    assert g3.scaled_shape == (257, 1024)  # scale 1 is never resized


def test_roi_crop_and_stitch_outside_is_zero() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (400, 600), dtype=np.uint8)
    roi = (50, 20, 450, 380)
    tiles, grid = preprocess(img, PreprocessParams(tile=128, stride=128, roi=roi))
    assert grid.roi == roi and grid.scaled_shape == (360, 400)
    np.testing.assert_array_equal(tiles[0], img[20:148, 50:178])
    out = stitch(tiles.astype(np.float32), grid)
    np.testing.assert_array_equal(out[20:380, 50:450], img[20:380, 50:450].astype(np.float32))
    outside = np.ones(img.shape, bool)
    outside[20:380, 50:450] = False
    assert (out[outside] == 0).all()
    assert stitch(tiles.astype(np.float32), grid, out_shape="roi").shape == (360, 400)
    with pytest.raises(ValueError, match="outside the frame"):
        preprocess(img, PreprocessParams(roi=(0, 0, 700, 100)))


def test_blank_tiles_are_flagged_invalid() -> None:
    img = fabric(256, 1024, 6.0)
    img[:, :520] = 255  # padding
    _, grid = preprocess(img, PreprocessParams(tile=256, stride=256))
    np.testing.assert_array_equal(grid.valid, [False, False, True, True])


def test_tile_mask_follows_the_image_geometry() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (300, 700), dtype=np.uint8)
    mask = np.zeros(img.shape, np.uint8)
    mask[100:140, 250:330] = 255
    tiles, grid = preprocess(img, PreprocessParams(tile=128, stride=128))
    mt = tile_mask(mask, grid)
    assert mt.shape == tiles.shape and mt.dtype == np.uint8
    for m, (y, x) in zip(mt, grid.coords, strict=True):
        np.testing.assert_array_equal(m, mask[y : y + 128, x : x + 128])
    # scaled: the mask shrinks with the image (nearest neighbour, values stay 0/255)
    _, g2 = preprocess(img, PreprocessParams(scale=0.5, tile=64, stride=64))
    m2 = tile_mask(mask, g2)
    assert set(np.unique(m2)) <= {0, 255}
    covered = np.zeros(g2.scaled_shape, np.uint8)
    for m, (y, x) in zip(m2, g2.coords, strict=True):
        covered[y : y + 64, x : x + 64] = np.maximum(covered[y : y + 64, x : x + 64], m)
    assert np.count_nonzero(covered) == 20 * 40
    with pytest.raises(ValueError, match="mask shape"):
        tile_mask(mask[:, :-1], grid)


def test_photometric_standardize_removes_gain_and_offset() -> None:
    img = fabric(256, 512, 6.0).astype(np.float32)
    dark = np.clip(img * 0.5 + 10, 0, 255).astype(np.uint8)
    bright = np.clip(img * 0.9 + 30, 0, 255).astype(np.uint8)
    params = PreprocessParams(tile=256, photometric="standardize", target_mean=128, target_std=40)
    t1, _ = preprocess(dark, params)
    t2, _ = preprocess(bright, params)
    assert t1.mean() == pytest.approx(128, abs=2) and t1.std() == pytest.approx(40, abs=2)
    assert np.abs(t1.astype(float) - t2.astype(float)).mean() < 1.5


def test_frame_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((64, 64), np.float32), PreprocessParams(tile=32, stride=32))
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((64, 64, 5), np.uint8), PreprocessParams(tile=32, stride=32))
    with pytest.raises(ValueError, match="N=4"):
        _, grid = preprocess(np.zeros((64, 64), np.uint8), PreprocessParams(tile=32, stride=32))
        stitch(np.zeros((3, 32, 32)), grid)


# ---------------------------------------------------------------- parameters


def test_params_round_trip_through_json() -> None:
    p = PreprocessParams(
        scale=0.75, tile=128, stride=64, roi=(1, 2, 300, 400), grayscale=False, photometric="standardize"
    )
    d = json.loads(json.dumps(p.to_dict()))
    assert PreprocessParams.from_dict(d) == p
    assert PreprocessParams.from_dict({}) == PreprocessParams()
    cfg = PreprocessConfig(p, target_pitch=6.5)
    d2 = json.loads(json.dumps(cfg.to_dict()))
    assert d2["target_pitch"] == 6.5 and d2["per_image_scale"] is True
    assert PreprocessConfig.from_dict(d2) == cfg
    assert PreprocessConfig.from_dict(PreprocessParams().to_dict()).target_pitch is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tile_size": 256}, "tile_size"),
        ({"stride": 0}, "stride"),
        ({"stride": 300}, "stride"),
        ({"scale": -1}, "scale"),
        ({"scale": "1"}, "scale"),
        ({"photometric": "hist"}, "photometric"),
        ({"roi": [5, 5, 2, 9]}, "roi"),
        ({"grayscale": "yes"}, "grayscale"),
        ({"tile": 12.5}, "tile"),
        ({"target_std": 0}, "target_std"),
    ],
)
def test_params_from_dict_names_the_bad_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PreprocessParams.from_dict({**PreprocessParams().to_dict(), **change})


def test_config_rejects_inconsistent_scale_policy() -> None:
    d = {**PreprocessParams().to_dict(), "target_pitch": None, "per_image_scale": True}
    with pytest.raises(ValueError, match="per_image_scale"):
        PreprocessConfig.from_dict(d)


def test_grid_round_trips_through_a_message_header() -> None:
    img = fabric(200, 300, 6.0)
    _, grid = preprocess(img, PreprocessParams(scale=0.8, tile=64, stride=48, roi=(10, 0, 290, 200)))
    g2 = TileGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert g2.frame_shape == grid.frame_shape and g2.roi == grid.roi
    assert g2.scaled_shape == grid.scaled_shape and g2.tile == grid.tile
    np.testing.assert_array_equal(g2.coords, grid.coords)
    np.testing.assert_array_equal(g2.valid, grid.valid)


def test_live_preprocessor_normalises_the_loop_size() -> None:
    frame = fabric(256, 512, 8.0, seed=7)
    cfg = PreprocessConfig(PreprocessParams(scale=1.0, tile=64, stride=64), target_pitch=6.0)
    pre = Preprocessor(cfg)
    tiles, grid = pre(frame)
    assert pre.scale == pytest.approx(0.75, rel=0.05)
    assert grid.scaled_shape[1] == pytest.approx(512 * 0.75, rel=0.05)
    assert estimate_pitch(np.ascontiguousarray(stitch(tiles.astype(np.float32), grid, out_shape="scaled")
                                              .astype(np.uint8))) == pytest.approx(6.0, rel=0.05)
    # a blank frame keeps the last scale; a fixed-scale config never measures
    pre(np.full((256, 512), 128, np.uint8))
    assert pre.scale == pytest.approx(0.75, rel=0.05)
    fixed = Preprocessor(PreprocessConfig(dataclasses.replace(cfg.params, scale=0.5)))
    _, g = fixed(frame)
    assert g.scaled_shape == (128, 256)
