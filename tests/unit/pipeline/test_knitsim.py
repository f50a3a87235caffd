"""Tests of the procedural knitted-fabric simulator (knitwatch.pipeline.sources.knitsim)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from knitwatch.pipeline.offline.synth import write_synth_dataset
from knitwatch.pipeline.sources.knitsim import (
    DEFECT_KINDS,
    TEXTURES,
    FabricSpec,
    KnitStream,
    ScheduledDefect,
    add_defect,
    cutline_halfwidth,
    measure_stream_rate,
    render_fabric,
    render_sample,
)

# a small stream: circumference 16 * 20 = 320 px, a 96 px wide view
SMALL = {"width": 96, "height": 64, "speed_px": 16.0, "revolution_frames": 20}


def dominant_period(img: np.ndarray, lo: float = 2.5, hi: float = 32.0) -> float:
    """Period (px) of the strongest peak of the column-mean profile's spectrum, periods in [lo, hi]."""
    g = img.astype(np.float64)
    if g.ndim == 3:
        g = g.mean(axis=2)
    prof = g.mean(axis=0)
    prof = (prof - prof.mean()) * np.hanning(prof.size)
    n = prof.size * 16  # zero padding: fine frequency grid
    spec = np.abs(np.fft.rfft(prof, n))
    freq = np.fft.rfftfreq(n)
    ok = (freq > 1.0 / hi) & (freq < 1.0 / lo)
    return float(1.0 / freq[np.flatnonzero(ok)[spec[ok].argmax()]])


def absdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return d.max(axis=2) if d.ndim == 3 else d


# --------------------------------------------------------------------------------------------------
# still pictures
# --------------------------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed():
    spec = FabricSpec()
    a = render_fabric(64, 80, spec, 7)
    b = render_fabric(64, 80, spec, 7)
    c = render_fabric(64, 80, spec, 8)
    assert a.tobytes() == b.tobytes()
    assert absdiff(a, c).mean() > 5  # a different piece of fabric, not just different noise
    s1, m1 = render_sample(64, 80, spec, 7, defect="hole")
    s2, m2 = render_sample(64, 80, spec, 7, defect="hole")
    assert s1.tobytes() == s2.tobytes() and m1.tobytes() == m2.tobytes()


@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("texture", TEXTURES)
def test_shapes_and_dtypes(texture, color):
    spec = FabricSpec(texture=texture, color=color)
    img = render_fabric(40, 56, spec, 1)
    assert img.dtype == np.uint8
    assert img.shape == ((40, 56, 3) if color else (40, 56))
    s, m = render_sample(40, 56, spec, 1, defect="oil_stain")
    assert s.shape == img.shape and s.dtype == np.uint8
    assert m.shape == (40, 56) and m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 255}
    s, m = render_sample(40, 56, spec, 1)
    assert not m.any()
    assert s.tobytes() == img.tobytes()  # no defect, no cutline: exactly render_fabric


def test_colour_is_a_tint_not_gray():
    img = render_fabric(48, 48, FabricSpec(color=True), 3).astype(np.float64)
    means = img.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() > 10


@pytest.mark.parametrize("brightness", [40.0, 128.0, 190.0])
def test_mean_gray_follows_brightness(brightness):
    img = render_fabric(96, 96, FabricSpec(brightness=brightness), 2)
    assert abs(img.mean() - brightness) < 0.08 * brightness
    assert img.std() > 8  # loops, not a flat field


@pytest.mark.parametrize("texture", TEXTURES)
@pytest.mark.parametrize("pitch", [4, 6, 8, 10])
def test_dominant_horizontal_period_is_pitch(texture, pitch):
    for seed in (0, 1):
        img = render_fabric(96, 160, FabricSpec(texture=texture, pitch_px=pitch), seed)
        est = dominant_period(img)
        assert abs(est - pitch) / pitch < 0.05, (texture, pitch, seed, est)


def test_x_offset_slides_the_web():
    spec = FabricSpec(noise_sigma=0.0)
    a = render_fabric(48, 120, spec, 4)
    b = render_fabric(48, 120, spec, 4, x_offset=37)
    assert absdiff(a[:, 37:], b[:, :83]).max() <= 1
    assert absdiff(a[:, :83], b[:, :83]).mean() > 5


@pytest.mark.parametrize("texture", TEXTURES)
def test_cutline_is_a_local_vertical_band(texture):
    spec = FabricSpec(texture=texture, noise_sigma=0.0)
    plain = render_fabric(80, 160, spec, 5)
    cut = render_fabric(80, 160, spec, 5, cutline_x=80)
    d = absdiff(plain, cut)
    cols = np.flatnonzero((d > 3).any(axis=0))
    half = cutline_halfwidth(spec)
    assert cols.size > 0
    assert cols.min() >= 80 - half - 3 and cols.max() <= 80 + half + 3
    # two needles left out: two dark lines the full height, darker than any normal column
    prof = cut.astype(np.float64).mean(axis=0)
    normal_min = plain.astype(np.float64).mean(axis=0).min()
    dark = np.flatnonzero(prof < normal_min - 10)
    assert dark.size >= 2 and dark.max() - dark.min() >= 3 * spec.pitch_px
    # a cutline out of view changes nothing
    assert render_fabric(80, 160, spec, 5, cutline_x=900).tobytes() == plain.tobytes()


@pytest.mark.parametrize(
    "spec", [FabricSpec(), FabricSpec(texture="pique", pitch_px=5, brightness=185, color=True)], ids=["gray", "colour"]
)
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_marks_exactly_what_changed(kind, spec):
    for seed in (0, 1):
        clean = render_fabric(96, 96, spec, seed)
        img, mask = render_sample(96, 96, spec, seed, defect=kind)
        assert mask.any(), kind
        d = absdiff(img, clean)
        inside = mask > 0
        assert (d[inside] > 6).mean() >= 0.5, (kind, (d[inside] > 6).mean())
        near = cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0
        assert ((d > 2) & ~near).sum() <= 2, kind  # outside the mask's 3 px rim: untouched


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_add_defect_center_size_and_input(kind):
    spec = FabricSpec(noise_sigma=0.0)
    base = render_fabric(128, 128, spec, 3)
    keep = base.copy()
    _, small = add_defect(base, kind, np.random.default_rng(0), spec, center=(40, 70), size=0.7)
    _, big = add_defect(base, kind, np.random.default_rng(0), spec, center=(40, 70), size=1.6)
    assert np.array_equal(base, keep)  # the input is not modified
    ys, xs = np.nonzero(small)
    assert xs.min() <= 40 <= xs.max() and ys.min() <= 70 <= ys.max()  # around the centre (x, y)
    assert xs.max() - xs.min() < 100 or kind == "tension_stripe"
    if kind == "needle_line":  # one wale, the whole height
        assert ys.min() == 0 and ys.max() == 127 and xs.max() - xs.min() < 2 * spec.pitch_px
    assert (big > 0).sum() > (small > 0).sum()


def test_intensity_scales_the_change():
    spec = FabricSpec(noise_sigma=0.0)
    base = render_fabric(96, 96, spec, 3)
    weak, m1 = add_defect(base, "oil_stain", np.random.default_rng(1), spec, center=(48, 48), intensity=0.4)
    strong, m2 = add_defect(base, "oil_stain", np.random.default_rng(1), spec, center=(48, 48), intensity=1.0)
    assert np.array_equal(m1, m2)
    assert absdiff(strong, base)[m2 > 0].mean() > 1.8 * absdiff(weak, base)[m1 > 0].mean()


def test_unknown_kind_and_texture_are_refused():
    with pytest.raises(ValueError):
        add_defect(np.zeros((32, 32), np.uint8), "rip", np.random.default_rng(0), FabricSpec())
    with pytest.raises(ValueError):
        FabricSpec(texture="rib")


def test_synth_dataset_layout(tmp_path):
    out = tmp_path / "ds"
    summary = write_synth_dataset(out, 10, 9, size=48, seed=3, progress=False, cutline_fraction=0.5)
    assert summary["train_good"] == 8 and summary["test_good"] == 2
    assert sum(summary["test_defect"].values()) == 9
    assert len(list((out / "train" / "good").glob("*.png"))) == 8
    assert len(list((out / "test" / "good").glob("*.png"))) == 2
    for kind in DEFECT_KINDS:
        imgs = sorted((out / "test" / kind).glob("*.png"))
        masks = sorted((out / "ground_truth" / kind).glob("*_mask.png"))
        assert len(imgs) == summary["test_defect"][kind] == len(masks) >= 1
        for im_path, m_path in zip(imgs, masks, strict=True):
            assert m_path.name == im_path.stem + "_mask.png"
            m = cv2.imread(str(m_path), cv2.IMREAD_GRAYSCALE)
            assert m.shape == (48, 48) and m.max() == 255
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["images"]) == 19
    brights = {r["brightness"] for r in meta["images"]}
    assert len(brights) > 10  # varied per image
    assert 0 < summary["cutline_images"] < 19
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind
    # rewriting replaces a data set; a foreign folder is refused
    write_synth_dataset(out, 2, 0, size=32, progress=False)
    assert len(list((out / "train" / "good").glob("*.png"))) == 2
    assert not (out / "test" / "hole").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_synth_dataset(foreign, 2, 0, size=32, progress=False)
    assert (foreign / "keep.txt").exists()


# --------------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------------


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def test_stream_cutline_once_per_revolution():
    st = KnitStream(**SMALL, seed=1)
    truths = [st.frame(i)[1] for i in range(60)]
    vis = [t.cutline_visible for t in truths]
    r = runs(vis)
    assert len(r) == 3, r
    assert [truths[a].revolution for a, _ in r] == [0, 1, 2]
    assert len({b - a for a, b in r}) == 1  # the same number of frames every revolution
    for t in truths:
        assert not t.mask.any() and not t.defects  # the cutline is not a defect
        if t.cutline_visible:
            x0, y0, x1, y1 = t.cutline_box
            assert 0 <= x0 < x1 <= SMALL["width"] and (y0, y1) == (0, SMALL["height"])
        else:
            assert t.cutline_box is None
    # the box moves right to left with the web
    a, b = r[0]
    xs = [truths[i].cutline_box[2] for i in range(a, b)]
    assert all(x2 <= x1 for x1, x2 in zip(xs, xs[1:], strict=False))
    # it is really there: the frame is darker in the box's columns
    img, t = st.frame(a + (b - a) // 2)
    x0, _, x1, _ = t.cutline_box
    prof = img.astype(np.float64).mean(axis=0)
    assert prof[x0:x1].min() < np.delete(prof, np.arange(x0, x1)).min() - 10


def test_stream_random_access_and_determinism():
    kw = {**SMALL, "defects": [ScheduledDefect("slub", 3)], "random_defect_rate": 0.1}
    a = KnitStream(**kw, seed=5)
    it = iter(a)
    seq = [next(it) for _ in range(25)]
    b = KnitStream(**kw, seed=5)
    for i in (24, 3, 17, 0, 9):  # out of order, on a fresh instance
        img, t = b.frame(i)
        assert img.tobytes() == seq[i][0].tobytes()
        assert t.mask.tobytes() == seq[i][1].mask.tobytes() and t.defects == seq[i][1].defects
        assert t.index == i
    c = KnitStream(**kw, seed=6)
    assert absdiff(c.frame(4)[0], seq[4][0]).mean() > 5


def test_stream_defects_where_truth_says():
    clean = KnitStream(**SMALL, seed=2)
    st = KnitStream(**SMALL, seed=2, defects=[ScheduledDefect("hole", 4, y=30),
                                              ScheduledDefect("needle_line", 7, every_revolution=True)])
    holes, needles = [], []
    for i in range(60):
        img, t = st.frame(i)
        ref, _ = clean.frame(i)  # same noise and lighting: only the defects differ
        d = absdiff(img, ref)
        kinds = [x["kind"] for x in t.defects]
        if "hole" in kinds:
            holes.append(i)
        if "needle_line" in kinds:
            needles.append(i)
        if not t.defects:
            assert not t.mask.any()
            assert (d > 12).sum() == 0, i
            continue
        assert t.mask.any()
        near = cv2.dilate(t.mask, np.ones((7, 7), np.uint8)) > 0
        assert ((d > 2) & ~near).sum() == 0, i
        assert (d[t.mask > 0] > 6).mean() > 0.5
        for x in t.defects:
            x0, y0, x1, y1 = x["box"]
            assert 0 <= x0 < x1 <= SMALL["width"] and 0 <= y0 < y1 <= SMALL["height"]
            assert t.mask[y0:y1, x0:x1].any()
    # the hole enters at frame 4, crosses the view once and is not seen again
    assert holes[0] == 4 and holes == list(range(holes[0], holes[-1] + 1))
    assert holes[-1] < 20
    # the broken needle's line comes back every revolution from frame 7 on
    r = runs([i in needles for i in range(60)])
    assert len(r) == 3 and r[0][0] == 7
    assert [st.frame(a)[1].revolution for a, _ in r] == [0, 1, 2]


def test_stream_hole_first_appears_at_right_edge():
    st = KnitStream(**SMALL, seed=3, defects=[ScheduledDefect("hole", 6)])
    assert not st.frame(5)[1].defects
    t = st.frame(6)[1]
    (d,) = t.defects
    assert d["box"][2] == SMALL["width"] or d["box"][0] > SMALL["width"] - 2 * SMALL["speed_px"]
    later = st.frame(7)[1].defects[0]["box"]
    assert later[0] < d["box"][0]  # moving left


def test_stream_lighting_drift_and_periodic_tube():
    still = KnitStream(**SMALL, seed=4, lighting_drift=0.0, spec=FabricSpec(noise_sigma=0.0))
    # no drift, no noise: the tube comes round again identically
    assert still.frame(3)[0].tobytes() == still.frame(23)[0].tobytes()
    drifting = KnitStream(**SMALL, seed=4, lighting_drift=0.3, spec=FabricSpec(noise_sigma=0.0))
    means = np.array([drifting.frame(i)[0].mean() for i in range(0, 400, 20)])
    base = np.array([still.frame(i)[0].mean() for i in range(0, 400, 20)])
    ratio = means / base
    assert ratio.max() - ratio.min() > 0.05  # the gain drifts ...
    assert np.abs(np.diff(ratio)).max() < 0.1  # ... slowly


def test_stream_colour_frames():
    st = KnitStream(**SMALL, spec=FabricSpec(color=True))
    img, t = st.frame(0)
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8
    assert t.mask.shape == (64, 96)


def test_measure_stream_rate_small():
    assert measure_stream_rate(5, width=128, height=96) > 10


@pytest.mark.slow
def test_full_size_stream_rate():
    assert measure_stream_rate(50) >= 10.0


def test_the_simulated_machine_changes_article_at_a_frame() -> None:
    from knitwatch.config.settings import CameraConfig, SimulatorConfig
    from knitwatch.pipeline.sources.base import make_source

    sim = SimulatorConfig(change_frame=13, revolution_frames=10, speed_px=40.0,
                          defects=[{"kind": "hole", "frame": 1}, {"kind": "hole", "frame": 15}])
    src = make_source(CameraConfig(id="c", source="simulator", width=128, height=64, simulator=sim))
    src.open()
    frames, truths = [], []
    for _ in range(25):
        frames.append(src.read())
        truths.append(src.truth)
    assert [t["texture"] for t in truths] == ["jersey"] * 13 + ["pique"] * 12
    assert [t["revolution"] for t in truths] == [0] * 10 + [1] * 3 + [2] * 10 + [3] * 2  # counting on
    holes = [t["frame"] for t in truths if t["defects"]]
    assert holes[0] == 1 and 15 in holes and not any(t["defects"] for t in truths[13:15])  # each on its fabric
    jersey, pique = frames[12].astype(float), frames[13].astype(float)
    assert abs(jersey - pique).mean() > 5  # another fabric, not the same one moved on
