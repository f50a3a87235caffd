"""PatchCore baseline: nearest-neighbour search, greedy coreset, smoothing, fit/predict on simulated knit
tiles (holes score above normal fabric) and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knitwatch.models.base import save_model
from knitwatch.models.checkpoint import load_checkpoint
from knitwatch.models.metrics import auroc
from knitwatch.models.patchcore.model import (
    FEATURE_DIM,
    PatchCore,
    fit_patchcore,
    gaussian_blur,
    greedy_coreset,
    nearest_distance,
)
from knitwatch.models.registry import build_model
from tests.helpers.markers import needs_lite0


def test_nearest_distance_matches_brute_force_in_any_chunking():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(257, 7, generator=gen)
    bank = torch.randn(31, 7, generator=gen)
    brute = torch.sqrt(((q[:, None, :] - bank[None]) ** 2).sum(-1)).min(dim=1).values
    for block in (1, 31, 100, 1 << 24):  # one query per chunk ... everything at once
        torch.testing.assert_close(nearest_distance(q, bank, max_block=block), brute, rtol=1e-4, atol=1e-4)
    assert float(nearest_distance(bank[:3], bank).max()) < 1e-3  # bank rows are at distance 0
    with pytest.raises(ValueError, match="empty"):
        nearest_distance(q, bank[:0])


def test_greedy_coreset_picks_the_far_points():
    gen = torch.Generator().manual_seed(1)
    cluster = 0.1 * torch.randn(20, 3, generator=gen)
    far = torch.tensor([[10.0, 0.0, 0.0], [0.0, -10.0, 0.0]])
    x = torch.cat([cluster, far])  # rows 20 and 21 are far from everything else
    picked = greedy_coreset(x, 3, projection_dim=None, start=0)
    assert picked.tolist()[0] == 0
    assert set(picked.tolist()[1:]) == {20, 21}
    for seed in range(5):  # whatever the (random) first pick, the two outliers are among the first three
        assert {20, 21} <= set(greedy_coreset(x, 3, projection_dim=None, seed=seed).tolist())
    # k-center property: every row is within the farthest-point radius of the coreset
    sel = greedy_coreset(x, 6, projection_dim=None, start=0)
    assert len(set(sel.tolist())) == 6
    with pytest.raises(ValueError):
        greedy_coreset(x, 0)


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((2, 1, 32, 32), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)
    spike = torch.zeros(1, 1, 64, 64)
    spike[0, 0, 32, 32] = 1.0
    out = gaussian_blur(spike, 2.0)
    assert out.shape == spike.shape
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(out[0, 0, 32, 32]) == float(out.max()) < 1.0


def _knit(n: int, tile: int, seed: int, defect: str | None = None) -> np.ndarray:
    from knitwatch.pipeline.sources.knitsim import FabricSpec, render_sample

    out = []
    for i in range(n):
        img = render_sample(tile, tile, FabricSpec(pitch_px=6), seed * 1000 + i, defect=defect)
        img = np.asarray(img[0] if isinstance(img, tuple) else img)
        if img.ndim == 3:
            img = img.mean(axis=-1)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def fitted():
    normal = _knit(40, 64, seed=0)
    return fit_patchcore(normal, coreset_ratio=0.25, val_fraction=0.3, progress=False, batch_size=8)


@needs_lite0
def test_fit_predict_scores_holes_above_normal(fitted, tmp_path):
    model, info = fitted
    assert info["bank_size"] == model.bank_size == round(0.25 * info["patches"])
    assert model.memory_bank.shape == (model.bank_size, FEATURE_DIM)
    assert model.is_calibrated and info["n_val"] == 12
    good = _knit(12, 64, seed=101)
    bad = _knit(12, 64, seed=202, defect="hole")
    maps, scores = model.predict(np.concatenate([good, bad]), batch_size=5)
    assert maps.shape == (24, 64, 64) and maps.dtype == np.float32 and scores.shape == (24,)
    np.testing.assert_allclose(scores, maps.reshape(24, -1).max(axis=1), rtol=1e-6)
    assert auroc(scores, np.r_[np.zeros(12), np.ones(12)]) > 0.9
    # the threshold (from 12 held-out normal tiles) sits above most unseen normal tiles, below most holes
    assert np.mean(scores[:12] < float(model.image_threshold)) >= 0.6
    assert np.mean(scores[12:] >= float(model.image_threshold)) >= 0.6

    # RGB input gives the same result as gray; the wrong tile size is refused
    rgb = np.repeat(good[:2, :, :, None], 3, axis=3)
    np.testing.assert_allclose(model.predict(rgb)[1], scores[:2], rtol=1e-5)
    with pytest.raises(ValueError, match="64x64"):
        model.predict(np.zeros((1, 32, 32), np.uint8))

    # the checkpoint carries everything: bank, thresholds, extractor weights
    path = save_model(tmp_path / "pc.ckpt", model, preprocess={"tile": 64, "grayscale": True})
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "patchcore"
    assert ckpt.hparams["bank_size"] == model.bank_size
    assert ckpt.thresholds == model.thresholds()
    loaded = build_model(ckpt)
    assert isinstance(loaded, PatchCore)
    maps2, scores2 = loaded.predict(np.concatenate([good, bad]))
    np.testing.assert_allclose(scores2, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps2, maps, rtol=1e-4, atol=1e-4)


@needs_lite0
def test_embedding_shape_and_frozen_extractor():
    model = PatchCore(128, 0)
    x = model.normalize_input(torch.zeros(2, 1, 128, 128, dtype=torch.uint8))
    emb = model.embed(x)
    assert emb.shape == (2, FEATURE_DIM, 16, 16)  # the stride-8 grid
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="empty"):
        model.predict(np.zeros((1, 128, 128), np.uint8))
