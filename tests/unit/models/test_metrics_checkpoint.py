"""Metrics against hand-computed cases, and the one-file checkpoint format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from knitwatch.models import registry as ckpt_mod
from knitwatch.models.base import save_model
from knitwatch.models.calibration import calibrate_f1_threshold, quantile_threshold
from knitwatch.models.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from knitwatch.models.efficientad.model import EfficientAD
from knitwatch.models.metrics import au_pro, auroc, best_f1_threshold, f1_at_threshold, roc_curve
from knitwatch.models.registry import build_model, register_model_kind

# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def test_auroc_hand_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # all tied: chance
    # ties across classes count one half: positives {1, 2} vs negative {1}: (0.5 + 1) / 2
    assert auroc([1, 1, 2], [0, 1, 1]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        auroc([1, 2], [1, 1])


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 10, 200).astype(float)  # many ties
    y = rng.integers(0, 2, 200)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert auroc(s, y) == pytest.approx(pairwise, abs=1e-12)
    fpr, tpr, _ = roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pairwise, abs=1e-12)


def test_roc_curve_hand_case():
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_f1():
    s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    y = [0, 0, 1, 0, 1, 1]
    # >= 0.3 predicts 4 positives: tp 3, fp 1, fn 0 -> F1 = 6/7
    assert f1_at_threshold(s, y, 0.3) == pytest.approx(6 / 7)
    # >= 0.7: tp 2, fp 0, fn 1 -> 4/5
    assert f1_at_threshold(s, y, 0.7) == pytest.approx(0.8)
    assert f1_at_threshold(s, y, 1.0) == 0.0
    thr, f1 = best_f1_threshold(s, y)
    assert thr == 0.3 and f1 == pytest.approx(6 / 7)
    assert calibrate_f1_threshold(np.array(s), np.array(y)) == (thr, f1)
    # ties in F1: the highest threshold wins (fewest alarms)
    thr, f1 = best_f1_threshold([1, 2, 3, 4], [0, 1, 0, 1])
    assert (thr, f1) == (2.0, pytest.approx(2 * 2 / (2 * 2 + 1)))


def test_au_pro_hand_case_single_region():
    # one 1x4 image: region = pixels 0 and 1 (scores .9, .5); normal pixels score .7 and .1.
    # curve: (0,0) (0,.5) (.5,.5) (.5,1) (1,1); up to FPR .3 the PRO is .5 -> normalised area .5
    maps = np.array([[[0.9, 0.5, 0.7, 0.1]]])
    masks = np.array([[[1, 1, 0, 0]]])
    assert au_pro(maps, masks, max_fpr=0.3) == pytest.approx(0.5)
    assert au_pro(maps, masks, max_fpr=1.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_au_pro_averages_regions_not_pixels():
    # region A = pixel 0 (score .9), region B = pixels 2..4 (score .2); normal pixels .5 .1 .1 .1.
    # At t=.9 the PRO is 1/2 (A fully found, B not), not 1/4 as a pixel-wise overlap would give.
    # curve: (0,0) (0,.5) (.25,.5) (.25,1) (1,1); area to .3 = .25*.5 + .05*1 = .175 -> /.3
    maps = np.array([[0.9, 0.5, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1]])
    masks = np.array([[1, 0, 1, 1, 1, 0, 0, 0]])
    assert au_pro(maps, masks) == pytest.approx(0.175 / 0.3)


def _au_pro_bruteforce(maps, masks, max_fpr, n_thr=3000):
    import cv2

    regions = []
    for m, g in zip(maps, masks, strict=True):
        n, lab = cv2.connectedComponents((g > 0).astype(np.uint8), connectivity=8)
        regions += [(m, lab == r) for r in range(1, n)]
    normal = masks == 0
    pts = []
    for t in np.linspace(maps.max() + 1e-9, maps.min(), n_thr):
        fpr = np.mean(maps[normal] >= t)
        pro = np.mean([np.mean(m[r] >= t) for m, r in regions])
        pts.append((fpr, pro))
    fpr, pro = np.array(pts).T
    keep = fpr <= max_fpr
    return np.trapezoid(pro[keep], fpr[keep]) / max_fpr


def test_au_pro_matches_threshold_sweep():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 24, 24), np.uint8)
    masks[0, 3:8, 3:9] = 1
    masks[0, 15:18, 15:22] = 1
    masks[1, 10:20, 2:5] = 1
    maps = rng.normal(0, 1, masks.shape) + 1.5 * masks
    exact = au_pro(maps, masks)
    assert exact == pytest.approx(_au_pro_bruteforce(maps, masks, 0.3), abs=5e-3)
    assert 0.5 < exact < 1.0


def test_quantile_threshold_margin():
    v = torch.arange(101, dtype=torch.float64)  # median 50, 0.99-quantile 99
    assert quantile_threshold(v, 0.99, 0.0) == pytest.approx(99.0)
    assert quantile_threshold(v, 0.99, 0.1) == pytest.approx(99.0 + 0.1 * 49.0)


# ------------------------------------------------------------------------------------------------
# checkpoint
# ------------------------------------------------------------------------------------------------


def _calibrated_model() -> EfficientAD:
    torch.manual_seed(0)
    model = EfficientAD("s", 64)
    g = torch.Generator().manual_seed(1)
    model.teacher_mean.copy_(torch.randn(1, 384, 1, 1, generator=g))
    model.teacher_std.copy_(torch.rand(1, 384, 1, 1, generator=g) + 0.1)
    model.set_map_quantiles((0.123456789, 1.987654321), (1e-7, 3.3e-3))
    model.set_thresholds(0.1 + 1e-9, 0.7 / 3)
    model.provenance = {"teacher": {"source": "file", "random_teacher": False}}
    return model


def test_checkpoint_roundtrip_bit_exact(tmp_path):
    model = _calibrated_model()
    path = save_model(
        tmp_path / "m.ckpt", model, preprocess={"tile": 64, "scale": 0.5}, provenance={"id": "abc"}, extra={"k": [1]}
    )
    assert not [p for p in os.listdir(tmp_path) if p != "m.ckpt"]  # no temp files left behind
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "efficientad-s"
    assert ckpt.hparams == {"size": "s", "tile_size": 64, "out_channels": 384, "ae_dropout": 0.2,
                            "map_padding": "replicate"}
    sd = model.state_dict()
    assert ckpt.state_dict.keys() == sd.keys()
    for k, v in sd.items():
        assert ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v), k
    # normalisation statistics and thresholds bit-exact
    for name in ("teacher_mean", "teacher_std", "q_st_start", "q_st_end", "q_ae_start", "q_ae_end"):
        assert torch.equal(ckpt.state_dict[name], getattr(model, name))
    assert ckpt.thresholds == {"image": float(model.image_threshold), "pixel": float(model.pixel_threshold)}
    assert ckpt.preprocess["scale"] == 0.5 and ckpt.preprocess["tile"] == 64
    assert ckpt.provenance["id"] == "abc" and ckpt.provenance["teacher"]["source"] == "file"
    assert ckpt.extra["k"] == [1] and "input" in ckpt.extra

    built = build_model(path)
    assert isinstance(built, EfficientAD) and not built.training
    for k, v in sd.items():
        assert torch.equal(built.state_dict()[k], v), k
    assert built.thresholds() == model.thresholds()
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    model.eval()
    np.testing.assert_array_equal(built.predict(tiles)[1], model.predict(tiles)[1])


def test_checkpoint_file_is_plain_data(tmp_path):
    model = _calibrated_model()
    path = save_model(tmp_path / "m.ckpt", model)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    meta = json.loads(raw["metadata"])
    assert set(meta) == {"kind", "hparams", "preprocess", "thresholds", "provenance", "extra"}


def _write(path, obj):
    torch.save(obj, path)
    return path


def test_checkpoint_errors_name_the_file(tmp_path):
    good = save_model(tmp_path / "good.ckpt", _calibrated_model())
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(256))
    raw = torch.load(good, weights_only=True)
    newer = dict(raw, format_version=FORMAT_VERSION + 1)
    broken_meta = dict(raw, metadata="{not json")
    cases = {
        "truncated.ckpt": None,
        "garbage.ckpt": None,
        "foreign.ckpt": {"0.weight": torch.zeros(1)},
        "newer.ckpt": newer,
        "brokenmeta.ckpt": broken_meta,
        "pickled.ckpt": nn.Linear(2, 2),  # arbitrary objects are never unpickled
        "missing.ckpt": None,
    }
    for name, obj in cases.items():
        path = tmp_path / name
        if obj is not None:
            _write(path, obj)
        with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError, match="not a knitwatch checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def test_save_refuses_unstorable_metadata(tmp_path):
    common = dict(kind="x", hparams={}, state_dict={}, preprocess={}, provenance={})
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "a.ckpt", thresholds={"image": float("nan")}, **common)
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_checkpoint(tmp_path / "b.ckpt", thresholds={"image": object()}, **common)
    assert list(tmp_path.iterdir()) == []
    # numpy scalars are stored as plain numbers
    save_checkpoint(tmp_path / "c.ckpt", thresholds={"image": np.float32(0.25)}, **common)
    assert load_checkpoint(tmp_path / "c.ckpt").thresholds == {"image": 0.25}


def test_overwrite_is_atomic(tmp_path):
    path = save_model(tmp_path / "m.ckpt", _calibrated_model())
    model = _calibrated_model()
    model.set_thresholds(0.5, 0.6)
    save_model(path, model)
    assert load_checkpoint(path).thresholds == {"image": 0.5, "pixel": float(torch.tensor(0.6))}
    assert sorted(os.listdir(tmp_path)) == ["m.ckpt"]


def test_registry_for_other_kinds(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_BUILDERS", dict(ckpt_mod._BUILDERS))

    def build_linear(c: Checkpoint) -> nn.Module:
        m = nn.Linear(c.hparams["n"], 1)
        m.load_state_dict(c.state_dict)
        return m

    lin = nn.Linear(3, 1)
    save_checkpoint(
        tmp_path / "l.ckpt",
        kind="test-linear",
        hparams={"n": 3},
        state_dict=lin.state_dict(),
        preprocess={},
        thresholds={"image": 1.0},
        provenance={},
    )
    with pytest.raises(CheckpointError, match="unknown model kind 'test-linear'"):
        build_model(tmp_path / "l.ckpt")
    register_model_kind("test-linear", build_linear)
    built = build_model(tmp_path / "l.ckpt")
    assert torch.equal(built.weight, lin.weight)
